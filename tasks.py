#!/usr/bin/env python3
"""The book's two commands (they need nothing but Python 3.11+):

    python3 tasks.py build   # installs what it needs, executes every chapter, builds the HTML book
    python3 tasks.py test    # installs what it needs, runs the whole test suite (smoke profile)

Without an active virtual environment (or conda environment) both create ``.venv/`` here
and run inside it; the pinned dependencies come from pyproject.toml and are installed
again only when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
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
    subprocess.run([*pip, "-e", f"{ROOT}[local,dev]"], check=True)
    stamp.touch()


def run(cmd: list[str], **env: str) -> int:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}).returncode


def build() -> int:
    """Execute every notebook (default profile, cached) and build the HTML; warnings fail."""
    jupyter_book = Path(sys.executable).parent / ("jupyter-book.exe" if os.name == "nt" else "jupyter-book")
    code = run([str(jupyter_book), "build", ".", "-W", "--keep-going"], BOOK_NO_PROGRESS="1")  # no bars in the pages
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


COMMANDS = {"build": build, "test": test}


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        return 2
    if sys.version_info < (3, 11):
        print(f"Python 3.11 以上が必要です（いまは {sys.version.split()[0]}）。", file=sys.stderr)
        return 2
    ensure_environment()
    ensure_dependencies()
    start = time.perf_counter()
    code = COMMANDS[sys.argv[1]]()
    print(f"（{sys.argv[1]}: {time.perf_counter() - start:.0f} 秒）")
    return code


if __name__ == "__main__":
    sys.exit(main())
