"""Layout and configuration: pins, the book's settings, chapter pairs and their first cell."""

import re
import tomllib
from pathlib import Path

import jupytext
import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


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


def toc_files():
    return [TOC["root"]] + [c["file"] for c in TOC["chapters"]]


def test_toc_lists_every_chapter_and_only_existing_files():
    listed = toc_files()
    for f in listed:
        assert (ROOT / f).with_suffix(".ipynb").exists() or (ROOT / f).with_suffix(".md").exists(), f
    assert CHAPTERS, "no chapter notebooks"
    for nb in CHAPTERS:
        assert f"book/{nb.stem}" in listed, f"{nb.name} is not in _toc.yml"


def cells(path):
    return [(c.cell_type, c.source.strip()) for c in jupytext.read(path).cells]


def test_every_chapter_is_paired_and_in_sync():
    sources = sorted((ROOT / "lessons_src").glob("*.md"))
    assert [p.stem for p in sources] == [p.stem for p in CHAPTERS]
    for src, nb in zip(sources, CHAPTERS):
        assert cells(src) == cells(nb), f"{src.name} and {nb.name} differ: run jupytext --sync"


def test_notebooks_are_stored_without_outputs_and_open_with_a_gpu_on_colab():
    for path in CHAPTERS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"
        assert nb.metadata["accelerator"] == "GPU"
        assert nb.metadata["colab"]["gpuType"]
        assert nb.metadata["kernelspec"]["name"] == "python3"


def test_first_code_cell_installs_this_repository_on_colab_only():
    url = CONFIG["repository"]["url"]
    for path in CHAPTERS:
        nb = nbformat.read(path, as_version=4)
        first = next(c for c in nb.cells if c.cell_type == "code").source
        assert 'if "google.colab" in sys.modules:' in first, path.name
        repos = re.findall(r'REPO = "([^"]+)"', first)
        assert repos == [url], f"{path.name}: {repos} != {url}"
        assert "git+{REPO}.git@" in first
        assert f"{PYPROJECT['project']['name']} @" in first


def test_no_myst_directives_inside_notebooks():
    """Colab shows MyST directives as raw text: notebooks use plain CommonMark."""
    for path in CHAPTERS:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "markdown":
                assert not re.search(r"^(```|:::)\{", cell.source, re.M), path.name


def test_exercise_cells_follow_the_template():
    """Each exercise: a skeleton raising NotImplementedError, then name = check("id", name)."""
    from solutions import list_exercises

    for path in CHAPTERS:
        source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        for ex in list_exercises(chapter=path.stem):
            m = re.search(rf'^(\w+) = check\("{ex.id}", (\w+)\)$', source, re.M)
            assert m and m[1] == m[2], f"{path.name}: no check line for {ex.id}"
            assert f'show_solution("{ex.id}")' in source, f"{path.name}: no show_solution for {ex.id}"
        assert source.count("raise NotImplementedError") == len(list_exercises(chapter=path.stem))
