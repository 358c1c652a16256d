"""ruff (rules in pyproject.toml) passes on the package, the tests, tasks.py, the book's Sphinx extension and every
notebook's code."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run([str(ruff), "check", "--no-cache", "--output-format", "concise",
                             "solutions", "tests", "tasks.py", "book", "_ext"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_reads_the_notebooks():
    """Guard against a configuration that silently skips .ipynb files."""
    ruff = Path(sys.executable).parent / "ruff"
    listed = subprocess.run([str(ruff), "check", "--show-files", "book"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120).stdout
    assert sorted(Path(p).name for p in listed.split() if p.endswith(".ipynb")) == \
        sorted(p.name for p in (ROOT / "book").glob("*.ipynb"))
