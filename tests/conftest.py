import os
import sys
from pathlib import Path

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
# order of their longest test (measured: Rainbow's learning test about 165 s, the others 30-90 s).
LONG_MODULES = ("test_rainbow_learning.py", "test_darts_learning.py", "test_lora_learning.py",
                "test_transformer_learning.py", "test_colab.py", "test_chapters.py", "test_vit_learning.py",
                "test_hpo_storage.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        return LONG_MODULES.index(module) if module in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)
