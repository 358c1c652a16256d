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


# The order of the collected tests decides how pytest-xdist (worksteal) shares them: it hands the first
# len/k tests to the first of k workers, the next share to the next, and an idle worker later takes tests
# from the end of another's queue. So the long tests are shared out here, longest first, each to the share
# with the least work so far (seconds measured in whole runs on 2 cores; a module whose tests
# share a module-scoped fixture stays in one share); the short ones fill the shares up to their sizes; the
# book's tests, which need every chapter's simulated Colab run, come last.
MODULE_SECONDS = {"test_rainbow_learning.py": 210, "test_lora_learning.py": 190, "test_darts_learning.py": 80,
                  "test_transformer_learning.py": 105, "test_vit_learning.py": 100, "test_hpo_storage.py": 50,
                  "test_hpo_learning.py": 25, "test_ppo_learning.py": 20, "test_quant_learning.py": 10,
                  "test_sam_learning.py": 10}
TEST_SECONDS = {"test_colab.py::test_runs_on_colab_from_its_first_cell[09_optuna]": 95,  # first match counts
                "test_colab.py::test_runs_on_colab_from_its_first_cell[05_quantization]": 80,
                "test_colab.py::test_runs_on_colab_from_its_first_cell": 45,
                "test_colab.py::test_a_library_the_first_cell_omits": 15,
                "test_colab.py::test_the_package_imports_only": 20,
                "test_chapters.py::test_filled_in_with_the_references_grades_all_pass": 25,
                "test_chapters.py::test_one_broken_answer_fails": 13}
LAST = ("test_book_build.py", "test_browser.py")


def pytest_collection_modifyitems(config, items):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    module = {id(i): i.nodeid.split("::")[0].rsplit("/", 1)[-1] for i in items}

    def seconds(item):
        test = module[id(item)] + "::" + item.nodeid.split("::", 1)[-1]
        return next((s for prefix, s in TEST_SECONDS.items() if test.startswith(prefix)), 0)

    groups: dict[str, list] = {}
    for item in items:
        key = module[id(item)] if module[id(item)] in MODULE_SECONDS else item.nodeid
        if module[id(item)] in MODULE_SECONDS or seconds(item):
            groups.setdefault(key, []).append(item)
    weight = {k: MODULE_SECONDS.get(k) or sum(seconds(i) for i in g) for k, g in groups.items()}
    heavy = {id(i) for g in groups.values() for i in g}
    last = [i for i in items if module[id(i)] in LAST]
    light = [i for i in items if id(i) not in heavy and module[id(i)] not in LAST]
    # the share sizes worksteal hands out: len // workers_remaining, in turn
    sizes, left = [], len(items)
    for remaining in range(workers, 0, -1):
        sizes.append(left // remaining)
        left -= sizes[-1]
    shares, load = [[] for _ in range(workers)], [0] * workers
    for key in sorted(groups, key=lambda k: -weight[k]):
        share = min(range(workers), key=lambda s: load[s])
        shares[share] += groups[key]
        load[share] += weight[key]
    tail = light + last  # the book's tests at the very end
    ordered = []
    for share, size in zip(shares, sizes, strict=True):
        fill = max(size - len(share), 0) if share is not shares[-1] else len(tail)
        ordered += share + tail[:fill]
        tail = tail[fill:]
    items[:] = ordered + tail


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
