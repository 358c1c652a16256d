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
# order of their longest test (measured: the executed book build about 4 min, Rainbow's learning test about
# 165 s, the others 30-90 s).
LONG_MODULES = ("test_book_build.py", "test_rainbow_learning.py", "test_darts_learning.py", "test_lora_learning.py",
                "test_transformer_learning.py", "test_colab.py", "test_chapters.py", "test_vit_learning.py",
                "test_hpo_storage.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        return LONG_MODULES.index(module) if module in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """The book as `python3 tasks.py build` makes it, built once per test run and shared by the pytest-xdist
    workers (the build test and the browser tests read the same HTML): every chapter executed in the smoke
    profile (a character missing from the plot font fails its cell there), strict (warnings fail the build)."""
    import fcntl
    import subprocess

    import yaml

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "built-book"
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "result.txt").exists():
            config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
            config["execute"]["execute_notebooks"] = "force"  # no cache from an earlier run
            # relative to the configuration file, which moves to the temporary directory
            config["sphinx"]["local_extensions"] = {
                name: str(ROOT / path) for name, path in config["sphinx"]["local_extensions"].items()}
            config_path = shared / "_config.yml"
            config_path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
            jupyter_book = Path(sys.executable).parent / "jupyter-book"
            result = subprocess.run(
                [str(jupyter_book), "build", str(ROOT), "--config", str(config_path), "--path-output", str(shared),
                 "-W", "--keep-going", "--all"], capture_output=True, text=True, timeout=1800,
                env={**os.environ, "BOOK_PROFILE": "smoke", "BOOK_NO_PROGRESS": "1"})
            (shared / "log.txt").write_text(result.stdout + result.stderr, encoding="utf-8")
            (shared / "result.txt").write_text(str(result.returncode))
    return BuiltBook(shared / "_build" / "html", int((shared / "result.txt").read_text()),
                     (shared / "log.txt").read_text(encoding="utf-8"), config_path=shared / "_config.yml")


class BuiltBook:
    def __init__(self, html, returncode, log, config_path):
        self.html, self.returncode, self.log, self.config_path = html, returncode, log, config_path
