"""Layout and configuration: pins, the book's settings, the installable package.

(What every chapter must satisfy is in test_chapters.py.)
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_pins_in_environment_yml_equal_pyproject():
    extras = PYPROJECT["project"]["optional-dependencies"]
    pinned = set(extras["local"] + extras["dev"])
    assert all("==" in p for p in pinned)
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert {p for p in pip if "==" in p} == pinned
    assert "torch==2.13.0" in pinned  # the CPU wheel here; an unpinned torch pulls CUDA builds


def test_japanese_ui_and_search():
    sphinx = CONFIG["sphinx"]["config"]
    assert sphinx["language"] == "ja" and sphinx["html_search_language"] == "ja"


def test_colab_button_from_one_repository_url():
    url = CONFIG["repository"]["url"]
    theme = CONFIG["sphinx"]["config"]["html_theme_options"]
    assert theme["repository_url"] == url
    assert theme["launch_buttons"]["colab_url"] == CONFIG["launch_buttons"]["colab_url"] == \
        "https://colab.research.google.com"
    assert PYPROJECT["project"]["urls"]["Homepage"] == url


def test_execution_is_cached_with_a_cell_timeout_and_exclusions():
    assert CONFIG["execute"]["execute_notebooks"] == "cache"
    assert CONFIG["execute"]["timeout"] > 0
    assert {"_build", ".venv", "lessons_src"} <= set(CONFIG["exclude_patterns"])
    assert CONFIG["only_build_toc_files"] is True


def test_the_wheel_colab_installs_carries_every_module(tmp_path):
    """Colab installs the package from git (not editable): every module and data file of solutions/ must be in it."""
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "solutions").rglob("*.py")}
    assert expected <= names, sorted(expected - names)
    data = {p.relative_to(ROOT).as_posix() for p in (ROOT / "solutions" / "data").glob("*") if p.is_file()}
    assert data <= names, sorted(data - names)          # stored reference runs that chapters draw bands from
