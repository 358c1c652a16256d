"""What every chapter listed in _toc.yml must satisfy; a new chapter is enrolled by its toc line.

Pairing with lessons_src/, Colab metadata and the first cell, the exercise template, the
registry against the notebook's check(...) calls, and grading as a reader does it: every exercise
filled in with its reference, saved and graded with `python -m solutions.grade` passes; with one
answer broken, that one fails with its message. (Each chapter also runs as shipped, unanswered and
whole, in the smoke profile in a simulated Colab: tests/test_colab.py.)
"""

import importlib
import inspect
import re
import subprocess
import sys

import jupytext
import nbformat
import pytest
import tomllib
import yaml

from chapters import CHAPTERS, ROOT, notebook_path, source_path, toc_files
from solutions import list_exercises
from solutions.checker import exercise_modules

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
CHECK_LINE = re.compile(r'^(\w+) = check\("(\w+)", (\w+)\)$', re.M)
ANY_CHECK = re.compile(r'\bcheck\(\s*["\'](\w+)["\']')


def code(chapter) -> str:
    nb = nbformat.read(notebook_path(chapter), as_version=4)
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def cells(path):
    return [(c.cell_type, c.source.strip()) for c in jupytext.read(path).cells]


def test_toc_and_book_agree():
    """Every listed file exists; every chapter notebook and source is listed (none escapes the chapter tests)."""
    for f in toc_files():
        assert (ROOT / f).with_suffix(".ipynb").exists() or (ROOT / f).with_suffix(".md").exists(), f
    assert CHAPTERS, "_toc.yml lists no chapter"
    assert sorted(p.stem for p in (ROOT / "book").glob("[0-9][0-9]_*.ipynb")) == sorted(CHAPTERS)
    assert sorted(p.stem for p in (ROOT / "lessons_src").glob("*.md")) == sorted(CHAPTERS)


def test_every_exercise_module_belongs_to_a_toc_chapter():
    """solutions/exercises/<topic>.py is found on disk, names its chapter, and registers only for it."""
    modules = exercise_modules()
    assert "solutions.exercises.transformer" in modules
    for name in modules:
        module = importlib.import_module(name)
        assert module.CHAPTER in CHAPTERS, f"{name}: CHAPTER = {module.CHAPTER!r} is not in _toc.yml"
    assert {ex.chapter for ex in list_exercises()} <= set(CHAPTERS)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_paired_and_in_sync(chapter):
    src, nb = source_path(chapter), notebook_path(chapter)
    assert src.exists() and nb.exists(), chapter
    assert cells(src) == cells(nb), f"{src.name} と {nb.name} が違います: jupytext --sync を実行してください"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_stored_without_outputs_and_opens_with_a_gpu_on_colab(chapter):
    nb = nbformat.read(notebook_path(chapter), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{chapter} has outputs"
    assert nb.metadata["accelerator"] == "GPU"
    assert nb.metadata["colab"]["gpuType"]
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_first_code_cell_installs_this_repository_on_colab_only(chapter):
    url = CONFIG["repository"]["url"]
    nb = nbformat.read(notebook_path(chapter), as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code").source
    assert 'if "google.colab" in sys.modules:' in first
    assert re.findall(r'REPO = "([^"]+)"', first) == [url]
    assert "git+{REPO}.git@" in first
    assert f"{PYPROJECT['project']['name']} @" in first
    second = [c for c in nb.cells if c.cell_type == "code"][1].source
    assert re.search(r"^rt = setup\(", second, re.M), "the second code cell is the settings cell: rt = setup(...)"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_no_myst_directives_inside_notebooks(chapter):
    """Colab shows MyST directives as raw text: notebooks use plain CommonMark."""
    for cell in nbformat.read(notebook_path(chapter), as_version=4).cells:
        if cell.cell_type == "markdown":
            assert not re.search(r"^(```|:::)\{", cell.source, re.M)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_registered_exercises_and_the_notebooks_checks_agree(chapter):
    """Each registered exercise: a skeleton, name = check("id", name), show_solution("id"); no other check."""
    source = code(chapter)
    registered = [ex.id for ex in list_exercises(chapter=chapter)]
    assert len(registered) >= 3, f"{chapter}: the chapter standard asks for at least three checked exercises"
    for exercise in registered:
        lines = [m for m in CHECK_LINE.finditer(source) if m[2] == exercise]
        assert lines and all(m[1] == m[3] for m in lines), f"{chapter}: no `name = check({exercise!r}, name)`"
        assert f'show_solution("{exercise}")' in source, f"{chapter}: no show_solution for {exercise}"
    assert set(ANY_CHECK.findall(source)) == set(registered), "check(...) names an exercise of another chapter"
    assert source.count("raise NotImplementedError") == len(registered)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_only_the_solution_cells_are_collapsed(chapter):
    """The book labels every collapsed output 模範解答を表示 (_config.yml): each show_solution cell is tagged
    hide-output, and no other cell is."""
    nb = nbformat.read(notebook_path(chapter), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            solution = cell.source.strip().startswith("show_solution(")
            assert solution == ("hide-output" in cell.metadata.get("tags", [])), cell.source[:200]


def filled_in(chapter: str, broken: str | None = None):
    """The chapter as a reader fills it in: each skeleton replaced by its reference's source, in the notebook's
    own cell (so later cells use the reader's objects, not the fallback). ``broken``: that exercise's answer is
    then redefined to return nothing, a wrong answer of any kind of exercise (function, class or factory)."""
    nb = nbformat.read(notebook_path(chapter), as_version=4)
    answers = {ex.id: inspect.getsource(ex.reference) for ex in list_exercises(chapter=chapter)}
    answered = set()
    for cell in nb.cells:
        m = CHECK_LINE.search(cell.source)
        if cell.cell_type == "code" and m and "raise NotImplementedError" in cell.source:
            wrong = f"\n\ndef {m[1]}(*args, **kwargs):  # 壊した答え\n    return None\n" if m[2] == broken else ""
            cell.source = answers[m[2]] + wrong + "\n\n" + cell.source[m.start():]
            answered.add(m[2])
    assert answered == set(answers)
    return nb


def grade_as_a_reader(nb, chapter: str, tmp_path):
    """Save the notebook and grade it with the command a reader runs."""
    path = tmp_path / f"{chapter}.ipynb"  # the grader finds the chapter's exercises by the file name
    nbformat.write(nb, path)
    result = subprocess.run([sys.executable, "-m", "solutions.grade", str(path)], capture_output=True, text=True,
                            cwd=ROOT, timeout=900)
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    return result, rows


def exercise_cells(chapter) -> list[tuple[int, str]]:
    """(cell index, exercise id) of every check(...) line, in notebook order."""
    nb = nbformat.read(notebook_path(chapter), as_version=4)
    return [(i, m[2]) for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code" and (m := CHECK_LINE.search(cell.source))]


# Both grading runs end the saved notebook with an exercise's cell. What comes after the last exercise uses
# the answers but grades nothing: it runs, with objects built from the same source, in the simulated Colab run
# of every chapter (tests/test_colab.py), and each full run would cost a chapter's smoke time again.


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_filled_in_with_the_references_grades_all_pass(chapter, tmp_path):
    """Strict mode (BOOK_STRICT=1): every answer passes and no cell up to the last exercise raises."""
    checks = exercise_cells(chapter)
    assert {e for _, e in checks} == {ex.id for ex in list_exercises(chapter=chapter)}
    nb = filled_in(chapter)
    nb.cells = nb.cells[:checks[-1][0] + 1]
    result, _ = grade_as_a_reader(nb, chapter, tmp_path)
    n = len(list_exercises(chapter=chapter))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"合計: {n} / {n} 合格" in result.stdout
    assert "エラーになったセル" not in result.stdout, result.stdout


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_one_broken_answer_fails_with_its_message(chapter, tmp_path):
    """The first answer in the notebook broken, the notebook saved up to its cell: that exercise fails with a
    reason, the grade says the others never ran, and the command exits with 1."""
    checks = exercise_cells(chapter)
    first, broken = checks[0]
    nb = filled_in(chapter, broken)
    nb.cells = nb.cells[:first + 1]
    result, rows = grade_as_a_reader(nb, chapter, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "不合格" in rows[broken] and len(rows[broken].split(maxsplit=2)) == 3, rows[broken]  # with a reason
    others = {e for _, e in checks} - {broken}
    assert all("未実行" in rows[e] for e in others), result.stdout
    assert f"合計: 0 / {len(others) + 1} 合格" in result.stdout
