import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BOOK_PROFILE", "smoke")

# Under pytest-xdist each worker gets its own temporary directory: the chapters keep their working files
# under tempfile.gettempdir() with fixed names, and two workers may run the same chapter at once.
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    import atexit
    import shutil
    import tempfile

    _tmp = tempfile.mkdtemp(prefix=f"book-tests-{worker}-")
    os.environ["TMPDIR"] = _tmp   # inherited by kernels and subprocesses
    tempfile.tempdir = None       # forget the cached default
    atexit.register(shutil.rmtree, _tmp, True)


# Longest first: pytest-xdist (worksteal) splits the collected list among the workers and an idle worker takes
# tests from the end of another's queue, so a long test collected late runs alone at the end. Modules in the
# order of their longest test (measured: the book build, which waits for every chapter's simulated Colab run,
# 4-6 min; Rainbow's learning test about 165-260 s, the others 30-130 s).
LONG_MODULES = ("test_book_build.py", "test_rainbow_learning.py", "test_darts_learning.py", "test_lora_learning.py",
                "test_transformer_learning.py", "test_colab.py", "test_chapters.py", "test_vit_learning.py",
                "test_hpo_storage.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        return LONG_MODULES.index(module) if module in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory):
    """A temporary directory all pytest-xdist workers of this run share (each worker has its own basetemp)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def colab_clone(tmp_path_factory):
    """The working tree as a git repository, for the first cells' `pip install git+...` (tests/colab.py)."""
    import colab

    return colab.clone_working_tree(tmp_path_factory.mktemp("colab-repo"))


@pytest.fixture(scope="session")
def colab_run(shared_tmp, colab_clone):
    """chapter -> its simulated Colab run (tests/colab.py), executed once per test run whoever asks first:
    test_colab checks it, and the book the browser tests read is built from its executed notebooks."""
    import colab
    from chapters import notebook_path

    return lambda chapter, wait=True: colab.run_chapter_once(chapter, notebook_path(chapter),
                                                             shared_tmp / "colab-runs", colab_clone, wait)


@pytest.fixture(scope="session")
def built_book(shared_tmp, colab_run):
    """The book built once per test run and shared by the pytest-xdist workers (the build test and the browser
    tests read the same HTML), strict (warnings fail the build), with every chapter's outputs: the notebooks
    as the simulated Colab run executed them (smoke profile, where a character missing from the plot font fails
    its cell), so no chapter runs a second time for the book."""
    import fcntl
    import shutil
    import subprocess
    import time

    import yaml

    from chapters import CHAPTERS

    # Before the book's lock, and last chapter first, skipping a chapter another worker is running: test_colab
    # asks for them first to last, so two workers run different chapters instead of one waiting for the other.
    runs, pending = {}, list(reversed(CHAPTERS))
    while pending:
        for chapter in list(pending):
            if (run := colab_run(chapter, wait=False)) is not None:
                runs[chapter] = run
                pending.remove(chapter)
        if pending:
            time.sleep(1)
    runs = {chapter: runs[chapter] for chapter in CHAPTERS}
    shared = shared_tmp / "built-book"
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "result.txt").exists():
            source = shared / "source"  # the book's sources, each chapter replaced by its executed notebook
            shutil.copytree(ROOT / "book", source / "book")
            shutil.copytree(ROOT / "assets", source / "assets")
            shutil.copy2(ROOT / "_toc.yml", source / "_toc.yml")
            for chapter, run in runs.items():
                if run.executed is not None:
                    shutil.copy2(run.executed, source / "book" / f"{chapter}.ipynb")
            config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
            config["execute"]["execute_notebooks"] = "off"
            # relative to the configuration file, which moves to the temporary directory
            config["sphinx"]["local_extensions"] = {
                name: str(ROOT / path) for name, path in config["sphinx"]["local_extensions"].items()}
            config_path = shared / "_config.yml"
            config_path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
            jupyter_book = Path(sys.executable).parent / "jupyter-book"
            result = subprocess.run(
                [str(jupyter_book), "build", str(source), "--config", str(config_path), "--path-output", str(shared),
                 "-W", "--keep-going", "--all"], capture_output=True, text=True, timeout=900)
            (shared / "log.txt").write_text(result.stdout + result.stderr, encoding="utf-8")
            (shared / "result.txt").write_text(str(result.returncode))
    return BuiltBook(shared / "_build" / "html", int((shared / "result.txt").read_text()),
                     (shared / "log.txt").read_text(encoding="utf-8"), config_path=shared / "_config.yml",
                     runs=runs)


class BuiltBook:
    def __init__(self, html, returncode, log, config_path, runs):
        self.html, self.returncode, self.log, self.config_path = html, returncode, log, config_path
        self.runs = runs  # chapter -> colab.Result whose executed notebook the page shows
