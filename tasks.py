#!/usr/bin/env python3
"""The book's two commands, and the install step they share (they need nothing but Python 3.11+):

    python3 tasks.py build   # installs what it needs, executes every chapter, builds the HTML book
    python3 tasks.py test    # installs what it needs, runs the whole test suite (smoke profile)
    python3 tasks.py install # only installs what the two others need (CI: beside apt's Chromium)

Without an active virtual environment (or conda environment) each creates ``.venv/`` here
and runs inside it; the pinned dependencies come from pyproject.toml and are installed
again only when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def in_environment() -> bool:
    return sys.prefix != sys.base_prefix or bool(os.environ.get("CONDA_PREFIX"))


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_environment() -> None:
    """Re-run this script inside ``.venv`` (created on first use) unless an env is active."""
    if in_environment():
        return
    if not venv_python().exists():
        print(f"仮想環境を作成します: {VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    os.execv(str(venv_python()), [str(venv_python()), str(Path(__file__).resolve()), *sys.argv[1:]])


def ensure_dependencies() -> None:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = Path(sys.prefix) / f".advanced-ml-engineering-{digest}"
    if stamp.exists():
        return
    print("依存パッケージをインストールします（初回は数分かかります）…", flush=True)
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    # No byte-compiling at install time: pip would compile all of the 16,000 modules installed, about 50 s on
    # 2 cores even in parallel, while the whole test command imports 6,100 of them (transformers: 180 of its
    # 2,900). Python compiles a module the first time it is imported and keeps the .pyc (see main()).
    subprocess.run([*pip, "--no-compile", "-e", f"{ROOT}[local,dev]"], check=True)
    stamp.touch()


def run(cmd: list[str], **env: str) -> int:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}).returncode


class BuildProgress:
    """Reads jupyter-book's log line by line and says, in Japanese, which chapter is executing, how long it
    should take in this profile (chapter_times.yml), how long it took, and for a failed chapter its cell and
    error. Chapters whose cached outputs are still valid are not executed and not announced."""

    START = re.compile(r"book/(\d\d_\w+)\.ipynb: Executing notebook using")
    DONE = re.compile(r"book/(\d\d_\w+)\.ipynb: Executed notebook in ([\d.]+) seconds")
    FAILED = re.compile(r"book/(\d\d_\w+)\.ipynb: WARNING: Executing notebook failed")
    NEXT_RECORD = re.compile(r"^(\S+\.ipynb: |reading sources|looking for|pickling|checking|writing|building|"
                             r"\x1b\[|Running|\[|build |There was)")

    def __init__(self, chapters: list[str], times: dict, profile: str):
        self.chapters, self.times, self.profile = chapters, times, profile
        self.failure: list[str] | None = None
        self.failed_chapter: str | None = None
        self.finished: list[tuple[str, float]] = []

    def name(self, chapter: str) -> str:
        number = self.chapters.index(chapter) + 1 if chapter in self.chapters else "?"
        return f"第{number}章 {chapter}"

    def feed(self, line: str) -> list[str]:
        """The progress lines to print for one line of the log."""
        line = re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip("\n"))
        if self.failure is not None and self.failed_chapter is not None:
            if self.NEXT_RECORD.match(line) or len(self.failure) >= 200:
                return self.report_failure()
            self.failure.append(line)
            return []
        if m := self.START.search(line):
            expected = self.times.get(m[1], {}).get(self.profile)
            hint = f"（{self.profile} プロファイルの目安: {expected}）" if expected else ""
            return [f"【進み具合】{self.name(m[1])} を実行しています{hint}…"]
        if m := self.DONE.search(line):
            self.finished.append((m[1], float(m[2])))
            return [f"【進み具合】{self.name(m[1])}: {float(m[2]):.0f} 秒で実行しました"]
        if m := self.FAILED.search(line):
            self.failed_chapter, self.failure = m[1], []
        return []

    def report_failure(self) -> list[str]:
        """The failed chapter, the cell that raised (nbclient prints its source between dashed lines) and the error."""
        lines, chapter = self.failure or [], self.failed_chapter
        self.failure, self.failed_chapter = None, None
        dashes = [i for i, text in enumerate(lines) if text.strip() and set(text.strip()) == {"-"}]
        cell = lines[dashes[0] + 1: dashes[1]] if len(dashes) >= 2 else []
        after_cell = lines[dashes[1] + 1:] if len(dashes) >= 2 else lines
        errors = [text for text in after_cell if re.match(r"^\w*(Error|Exception)\b.*:", text)]
        out = [f"【失敗】{self.name(chapter)} の実行に失敗しました。"]
        if cell:
            out += ["  失敗したセル:", *(f"    {text}" for text in cell)]
        out.append(f"  エラー: {errors[0] if errors else '（上のログを確認してください）'}")
        return out

    def close(self) -> list[str]:
        out = self.report_failure() if self.failed_chapter else []
        if self.finished:
            total = sum(seconds for _, seconds in self.finished)
            out.append(f"【進み具合】実行した章: {len(self.finished)}、合計 {total:.0f} 秒"
                       "（ほかの章はキャッシュにある結果を使いました）")
        return out


def build_progress() -> BuildProgress:
    import yaml

    from solutions.runtime import get_profile

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    chapters = [m[1] for e in toc.get("chapters", []) if (m := re.fullmatch(r"book/(\d\d_\w+)", e["file"]))]
    times = yaml.safe_load((ROOT / "chapter_times.yml").read_text(encoding="utf-8"))
    return BuildProgress(chapters, times, get_profile())


def build() -> int:
    """Execute every notebook (default profile, cached) and build the HTML; warnings fail."""
    jupyter_book = Path(sys.executable).parent / ("jupyter-book.exe" if os.name == "nt" else "jupyter-book")
    progress = build_progress()
    cmd = [str(jupyter_book), "build", ".", "-W", "--keep-going"]
    print("$ " + " ".join(cmd), flush=True)
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env={**os.environ, "BOOK_NO_PROGRESS": "1"}) as proc:  # no progress bars in the pages
        for line in proc.stdout:
            print(line, end="", flush=True)
            for message in progress.feed(line):
                print(message, flush=True)
    for message in progress.close():
        print(message, flush=True)
    code = proc.returncode
    index = ROOT / "_build" / "html" / "index.html"
    if code == 0 and index.exists():
        print(f"\n本ができました: {index}\nブラウザで開く: {index.as_uri()}")
    else:
        print("\nビルドに失敗しました（上のエラーを確認してください）。", file=sys.stderr)
    return code or (0 if index.exists() else 1)


def test() -> int:
    """Unit, parity, checker and learning tests, the strict build without execution, and every chapter run
    from its first cell in a simulated Colab (smoke profile). Tests run in one pytest-xdist worker per core
    (at most 4), each PyTorch process on one thread: two processes with two threads each on two cores run
    several times slower than one."""
    workers = str(min(4, os.cpu_count() or 1))
    return run([sys.executable, "-m", "pytest", "-q", "-rs", "--durations=15", "-n", workers, "--dist", "worksteal"],
               BOOK_PROFILE="smoke", OMP_NUM_THREADS="1")


def install() -> int:
    """Nothing beyond what every command does first: the environment and the pinned dependencies."""
    print("依存パッケージはインストール済みです。")
    return 0


COMMANDS = {"build": build, "test": test, "install": install}


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        return 2
    if sys.version_info < (3, 11):
        print(f"Python 3.11 以上が必要です（いまは {sys.version.split()[0]}）。", file=sys.stderr)
        return 2
    # The commands start a hundred Python processes (test workers, kernels, the chapters' own workers), each
    # importing torch: with PYTHONDONTWRITEBYTECODE set (some CI images set it) none would keep the compiled
    # modules and every one would compile them again. The .pyc files go to .venv and this project's
    # __pycache__ folders, which git ignores.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    ensure_environment()
    ensure_dependencies()
    start = time.perf_counter()
    code = COMMANDS[sys.argv[1]]()
    print(f"（{sys.argv[1]}: {time.perf_counter() - start:.0f} 秒）")
    return code


if __name__ == "__main__":
    sys.exit(main())
