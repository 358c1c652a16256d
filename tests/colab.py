"""Colab, simulated offline: a bare environment, the chapter's own first cell, the chapter in smoke.

A reader opens a chapter in Colab, where nothing of this project is installed: the chapter's
first cell takes its "on Colab" branch and installs the ``solutions`` package from the
repository plus whatever else the chapter needs. This module rebuilds that situation here:

1. ``base_env()``: a virtual environment holding only ``COLAB_BASE`` (what every Colab runtime
   already has), the versions pinned in pyproject.toml. Built once and kept (``.colab-sim/``).
2. ``chapter_env(first_cell)``: an empty environment per chapter layered over the base (a .pth
   file puts the base's site-packages after its own), with a stub ``google.colab`` imported at
   start-up, so ``"google.colab" in sys.modules`` holds in its kernel as on Colab. Everything a
   chapter gets beyond the base comes from its first cell, so the cache key is that cell's
   text plus the package's own dependencies: a cached environment holds exactly what the
   first cell installed, and a library it does not install is never there.
3. ``run_chapter(...)``: the notebook, unchanged, executed cell by cell (nbclient, stopping at the
   first error) in that environment's kernel from an empty working directory (Colab's /content),
   with the repository URL of the first cell redirected by git's ``url.<base>.insteadOf`` to a
   temporary clone of the working tree, so the cell runs verbatim and installs this checkout's
   package. The executed notebook is kept: the book the browser tests read is built from it
   (``run_chapter_once``: each chapter runs once per test session, whichever test needs it first).

pip installs resolve against pyproject.toml's pins (``PIP_CONSTRAINT``): the first cells'
loose bounds must admit the versions the book is tested with, and the run is reproducible.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SIM = ROOT / ".colab-sim"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
REPOSITORY = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))["repository"]["url"].rstrip("/")

# What a Colab runtime has before any cell runs, and all that a chapter may assume without installing it.
# Colab preinstalls much more (scikit-learn, transformers, ...), but which versions, and whether at all,
# changes from one runtime image to the next; a chapter that needs one of them installs it in its first cell.
COLAB_BASE = {
    "torch": "Colab's PyTorch is built for its GPU and must never be replaced by a first cell; here the same CPU "
             "build as .venv, installed first so that no later install replaces it",
    "numpy": "a dependency of torch's ecosystem that every Colab image ships",
    "matplotlib": "Colab renders plots inline with its own matplotlib",
    "ipykernel": "the kernel the notebook runs in",
}


def pins() -> dict[str, str]:
    """name → exact requirement, from pyproject's pinned extras (the one place versions live)."""
    out = {}
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        for line in extra:
            req = Requirement(line)
            out[canonicalize_name(req.name)] = line
    return out


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n\x00".join(parts).encode()).hexdigest()[:12]


def _python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _site_packages(env: Path) -> Path:
    out = subprocess.run([_python(env), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out)


@contextlib.contextmanager
def _locked(name: str):
    """Held while an environment is built: the test command runs several pytest-xdist workers."""
    SIM.mkdir(exist_ok=True)
    with open(SIM / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def constraints_file() -> Path:
    SIM.mkdir(exist_ok=True)
    path = SIM / "constraints.txt"
    # the libraries a chapter may install (pyproject's local extra): a new pin of a tool (pytest, jupyter-book)
    # does not change this file, so it does not rebuild the cached environments
    text = "".join(line + "\n" for line in sorted(PYPROJECT["project"]["optional-dependencies"]["local"]))
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)  # atomic: another worker never reads half a file
    return path


def base_env() -> Path:
    """The shared bottom layer: COLAB_BASE at the pinned versions, torch installed first."""
    requirements = [pins()[canonicalize_name(name)] for name in COLAB_BASE]
    env = SIM / f"base-{_digest(sys.version, *requirements)}"
    with _locked("base"):
        if not (env / ".complete").exists():
            _build_base(env, requirements)
    return env


def _build_base(env: Path, requirements: list[str]) -> None:
    for old in SIM.glob("base-*"):
        shutil.rmtree(old, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    # --no-compile: Python compiles what a chapter imports when it imports it; compiling every module of torch
    # at install time costs the test command minutes and tells nothing about Colab.
    pip = [str(_python(env)), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    for requirement in requirements:  # one at a time, torch first: nothing later may replace it
        subprocess.run([*pip, requirement], check=True)
    (env / ".complete").touch()


def first_cell(notebook: Path) -> str:
    nb = nbformat.read(notebook, as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code")


def first_cell_requirements(source: str) -> list[Requirement]:
    """The libraries a first cell installs besides this repository's package (string literals with a bound)."""
    names = re.findall(r'"([A-Za-z0-9][A-Za-z0-9._\-]*\s*(?:[<>=!~]=?|===)[^"]*)"', source)
    return [Requirement(n) for n in names]


def chapter_env(name: str, cell: str) -> Path:
    """An environment for one first cell: empty over the base, with google.colab importable and imported."""
    base = base_env()
    key = _digest(base.name, cell, json.dumps(PYPROJECT["project"]["dependencies"]),
                  constraints_file().read_text())
    env = SIM / f"{name}@{key}"
    with _locked(name):
        if not (env / ".complete").exists():
            _build_chapter_env(env, name, base)
    return env


def _build_chapter_env(env: Path, name: str, base: Path) -> None:
    for old in SIM.glob(f"{name}@*"):
        shutil.rmtree(old, ignore_errors=True)
    # No pip of its own: the base's pip (found through the .pth below) installs into this prefix.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = _site_packages(env)
    (site / "_colab_base.pth").write_text(f"{_site_packages(base)}\n")
    stub = site / "google" / "colab"  # a namespace package "google": protobuf's google.* stays importable
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('"""Stand-in for Colab\'s google.colab (tests/colab.py)."""\n')
    (site / "_colab_sim.pth").write_text("import google.colab\n")
    kernels = env / "share" / "jupyter" / "kernels" / "colab-sim"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(_python(env)), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Colab (simulated): {name}", "language": "python"}))
    (env / ".complete").touch()


def clone_working_tree(dest: Path) -> Path:
    """A git repository at dest/<name>.git whose branch main holds the working tree as it is now
    (tracked and untracked files that git does not ignore), as pip will fetch it."""
    repo = dest / (REPOSITORY.rsplit("/", 1)[1] + ".git")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():  # a deleted but still tracked file is skipped
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / f)
    git = ["git", "-c", "user.name=colab-sim", "-c", "user.email=colab-sim@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "working tree"], cwd=repo, check=True)
    return repo


def imported_distributions_code(out: str) -> str:
    """Python source that writes, as JSON, the installed distributions whose modules the interpreter has
    imported so far, to the file ``out`` ("-": standard output)."""
    return f"""\
import importlib.metadata as _md, json as _json, sys as _sys
_top = {{_m.split(".")[0] for _m in list(_sys.modules)}}
_dists = _md.packages_distributions()
_found = _json.dumps(sorted({{_d for _t in _top for _d in _dists.get(_t, [])}}))
print(_found) if {out!r} == "-" else open({out!r}, "w").write(_found)
"""


# Appended to the notebook copy: which installed distributions the chapter imported, for the "exactly" check.
PROBE = imported_distributions_code("colab_sim_imported.json")


# Runs in the test environment (which has nbclient), driving the chapter environment's kernel: every code cell in
# order, stopping at the first error like a reader's "run all"; the executed notebook and each code cell's
# seconds (code cells numbered from 0, the first cell being the installs) are written next to it.
EXECUTE = """\
import json, sys, time
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
path, out, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3])
nb = nbformat.read(path, as_version=4)
client = NotebookClient(nb, timeout=timeout, kernel_name="colab-sim", resources={"metadata": {"path": "."}})
seconds, failed = {}, False
with client.setup_kernel():
    code_cells = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    for number, (index, cell) in enumerate(code_cells):
        start = time.perf_counter()
        try:
            client.execute_cell(cell, index)
        except CellExecutionError as error:
            print(f"Cell {number} failed:\\n{error}")
            failed = True
        seconds[number] = round(time.perf_counter() - start, 2)
        if failed:
            break
nbformat.write(nb, out)
json.dump(seconds, open("cell_seconds.json", "w"))
sys.exit(1 if failed else 0)
"""


@dataclass
class Result:
    returncode: int
    output: str
    missing: list[str]          # module names a cell failed to import
    imported: set[str] | None   # canonical names of the distributions the chapter had imported at the end
    verdicts: list[dict]        # what each check(...) wrote to BOOK_GRADE_LOG
    seconds: dict[int, float]   # code cell number → seconds (cell 0: the first cell's installs)
    executed: Path | None       # the notebook with its outputs, the probe cell removed

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "imported": None if self.imported is None else sorted(self.imported),
                           "executed": None if self.executed is None else str(self.executed)})

    @classmethod
    def from_json(cls, text: str) -> Result:
        d = json.loads(text)
        return cls(**{**d, "imported": None if d["imported"] is None else set(d["imported"]),
                      "seconds": {int(k): v for k, v in d["seconds"].items()},
                      "executed": None if d["executed"] is None else Path(d["executed"])})


def run_chapter(notebook: Path, env: Path, clone: Path, workdir: Path, timeout: int = 600) -> Result:
    """Execute the notebook (plus the probe cell) in env's kernel, from an empty workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(notebook, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    copy = workdir / notebook.name
    nbformat.write(nb, copy)
    log = workdir / "verdicts.jsonl"
    # PYTHONDONTWRITEBYTECODE (set on some CI images) goes too: the packages were installed without .pyc, and
    # without it every kernel, and every process a chapter starts, would compile torch anew on import (about
    # 6 s each time); Colab's packages come compiled.
    env_vars = {k: v for k, v in os.environ.items()
                if k not in {"PYTHONPATH", "VIRTUAL_ENV", "JUPYTER_PATH", "BOOK_STRICT", "BOOK_GRADE_LOG",
                             "PYTHONDONTWRITEBYTECODE"}}
    env_vars.update(
        BOOK_PROFILE="smoke", BOOK_GRADE_LOG=str(log), JUPYTER_PATH=str(env / "share" / "jupyter"),
        # pip: the book's pins, and no .pyc at install time (a chapter compiles what it imports when it imports it)
        PIP_CONSTRAINT=str(constraints_file()), PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_COMPILE="0",
        # and the package built with the environment's setuptools, without an isolated build environment (pip
        # reads "0" as "--no-build-isolation": 4 s instead of 9 s a chapter). The package-only test in
        # tests/test_colab.py still builds it in isolation, as Colab does, so pyproject.toml's build requirements
        # stay checked.
        PIP_NO_BUILD_ISOLATION="0",
        # the first cell's URL, verbatim, fetched from the temporary clone
        GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0=f"url.{clone.parent.as_uri()}/.insteadOf",
        GIT_CONFIG_VALUE_0=REPOSITORY.rsplit("/", 1)[0] + "/")
    # The package itself always comes from this run's clone, never from the cache.
    subprocess.run([str(_python(env)), "-m", "pip", "uninstall", "-q", "-y", PYPROJECT["project"]["name"]],
                   capture_output=True, env=env_vars)
    executed = workdir / "executed" / notebook.name
    executed.parent.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", EXECUTE, copy.name, str(executed), str(timeout)],
                          cwd=workdir, env=env_vars, capture_output=True, text=True)
    output = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # tracebacks come coloured
    missing = sorted(set(re.findall(r"ModuleNotFoundError: No module named '([\w.]+)'", output)))
    probe = workdir / "colab_sim_imported.json"
    imported = {canonicalize_name(d) for d in json.loads(probe.read_text())} if probe.exists() else None
    verdicts = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []
    times = workdir / "cell_seconds.json"
    seconds = {int(k): v for k, v in json.loads(times.read_text()).items()} if times.exists() else {}
    if executed.exists():
        done = nbformat.read(executed, as_version=4)
        done.cells = done.cells[:-1]  # the probe
        nbformat.write(done, executed)
    return Result(proc.returncode, output, missing, imported, verdicts, seconds,
                  executed if executed.exists() else None)


def run_chapter_once(chapter: str, notebook: Path, shared: Path, clone: Path, wait: bool = True) -> Result | None:
    """The chapter's simulated Colab run, done once per test session (several pytest-xdist workers may ask):
    the first caller runs it in ``shared/<chapter>`` and records the result, the others read it. With
    ``wait=False``, None while another worker is running it (the caller can run another chapter meanwhile)."""
    where = shared / chapter
    where.mkdir(parents=True, exist_ok=True)
    with open(where / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        if not (where / "result.json").exists():
            result = run_chapter(notebook, chapter_env(chapter, first_cell(notebook)), clone, where / "content")
            record_times(chapter, result)
            (where / "result.json").write_text(result.to_json(), encoding="utf-8")
        return Result.from_json((where / "result.json").read_text(encoding="utf-8"))


def record_times(chapter: str, result: Result) -> None:
    """Keep the last measured set-up (first cell) and whole-run seconds in .colab-sim/timings/<chapter>.json."""
    path = SIM / "timings" / f"{chapter}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"first_cell_s": round(result.seconds.get(0, 0.0), 1),
                                "total_s": round(sum(result.seconds.values()), 1)}))
