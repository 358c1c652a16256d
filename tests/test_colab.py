"""Every chapter of _toc.yml as a reader runs it on Colab: a bare environment, the chapter's own first
cell (its "on Colab" branch, installing this checkout through a temporary clone), then the whole
notebook in the smoke profile, cell by cell, stopping at the first error. This is the run that proves
every notebook runs (and the book the browser tests read shows its outputs); the environments are
cached in .colab-sim/ (see tests/colab.py for what is simulated and how).
"""

import json
import os
import subprocess

import nbformat
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import colab
from chapters import CHAPTERS, notebook_path
from solutions import list_exercises
from solutions.checker import MISSING

BASE = {canonicalize_name(n) for n in colab.COLAB_BASE}
# Distributions that come with the package (its declared dependencies); a first cell must not repeat them.
PACKAGE_DEPS = {canonicalize_name(Requirement(r).name) for r in colab.PYPROJECT["project"]["dependencies"]}


def assert_runs_on_colab(chapter: str, result: colab.Result, installs: set[str]) -> None:
    """The verdict of one simulated Colab run, with the chapter and the missing library named."""
    if result.missing:
        raise AssertionError(f"{chapter}: 最初のセルがインストールしないライブラリを import しています: "
                             f"{', '.join(result.missing)}（最初のセルの pip install に加えてください）")
    tail = result.output[-6000:]
    assert result.returncode == 0, f"{chapter}: Colab の手順（最初のセル、続けて smoke）で失敗しました\n{tail}"
    assert result.imported is not None, tail
    unused = sorted(installs - result.imported)
    assert not unused, f"{chapter}: 最初のセルが入れる {unused} を、章は一度も import していません"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_first_cell_adds_loose_bounds_to_what_colab_has(chapter):
    """Lower bounds only (Colab's CUDA builds and newer releases stay), never the base or the package's own deps,
    and each bound admits the version the book is tested with."""
    pinned = colab.pins()
    for req in colab.first_cell_requirements(colab.first_cell(notebook_path(chapter))):
        name = canonicalize_name(req.name)
        assert name not in BASE, f"{chapter}: Colab にある {req.name} を最初のセルで入れ直しています"
        assert name not in PACKAGE_DEPS, f"{chapter}: {req.name} はパッケージの依存なので、最初のセルには要りません"
        assert req.specifier and all(s.operator == ">=" for s in req.specifier), f"{chapter}: {req} は下限だけに"
        version = Requirement(pinned[name]).specifier
        assert req.specifier.contains(next(iter(version)).version), f"{chapter}: {req} がテストの版を含みません"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_runs_on_colab_from_its_first_cell(chapter, colab_run):
    cell = colab.first_cell(notebook_path(chapter))
    installs = {canonicalize_name(r.name) for r in colab.first_cell_requirements(cell)}
    result = colab_run(chapter)
    assert_runs_on_colab(chapter, result, installs)
    # As shipped, every exercise is unanswered: each check says so and the chapter goes on with the reference.
    expected = {ex.id for ex in list_exercises(chapter=chapter)}
    assert {v["exercise_id"] for v in result.verdicts} == expected, result.verdicts
    assert all(v["status"] == MISSING for v in result.verdicts), result.verdicts


def test_a_library_the_first_cell_omits_fails_with_the_chapter_and_its_name(colab_clone, tmp_path):
    """Chapter 6 with gymnasium dropped from its first cell: the run stops at the import and the test names both."""
    chapter, dropped = "06_rainbow", '"gymnasium>=1.0", '
    cell = colab.first_cell(notebook_path(chapter))
    assert dropped in cell
    notebook = tmp_path / f"{chapter}.ipynb"
    nb = nbformat.read(notebook_path(chapter), as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    first.source = cell.replace(dropped, "")
    nbformat.write(nb, notebook)
    result = colab.run_chapter(notebook, colab.chapter_env(f"{chapter}-without-gymnasium", first.source),
                               colab_clone, tmp_path / "content")
    assert result.returncode != 0
    with pytest.raises(AssertionError, match=r"06_rainbow: 最初のセルがインストールしないライブラリ.*gymnasium"):
        assert_runs_on_colab(chapter, result, set())


def test_the_package_imports_only_its_declared_dependencies(colab_clone, tmp_path):
    """`import solutions` (what every chapter's settings cell does) needs nothing beyond the package's
    dependencies, and each dependency is really imported (none is there only in case)."""
    env = colab.chapter_env("package-only", "")
    python = str(colab._python(env))
    name = colab.PYPROJECT["project"]["name"]
    pip_env = {**os.environ, "PIP_CONSTRAINT": str(colab.constraints_file())}
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", name], capture_output=True)
    subprocess.run([python, "-m", "pip", "install", "-q", f"{name} @ git+{colab_clone.as_uri()}@main"], check=True,
                   env=pip_env)
    probe = "import solutions\n" + colab.imported_distributions_code("-")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout
    imported = {canonicalize_name(d) for d in json.loads(out)} - {canonicalize_name(name)}
    assert imported >= PACKAGE_DEPS, f"宣言しているのに import しない依存: {sorted(PACKAGE_DEPS - imported)}"
    # What the dependencies pull in themselves (torch's sympy, matplotlib's pillow, ...) is theirs, not ours.
    closure_probe = ("import importlib.metadata as md, json, re, sys\n"
                     "todo, seen = list(sys.argv[1:]), set()\n"
                     "while todo:\n"
                     "    n = todo.pop()\n"
                     "    if n in seen: continue\n"
                     "    seen.add(n)\n"
                     "    try: reqs = md.requires(n) or []\n"
                     "    except md.PackageNotFoundError: continue\n"
                     "    todo += [re.match(r'[A-Za-z0-9._-]+', r)[0] for r in reqs if 'extra ==' not in r]\n"
                     "print(json.dumps(sorted(seen)))")
    out = subprocess.run([python, "-c", closure_probe, *PACKAGE_DEPS], capture_output=True, text=True,
                         check=True).stdout
    closure = {canonicalize_name(d) for d in json.loads(out)}
    assert imported <= closure, f"依存に宣言していないのに import するもの: {sorted(imported - closure)}"
