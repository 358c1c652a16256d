"""`python3 tasks.py build` tells the reader which chapter is executing, how long it should take and how long it
took, and names the cell and error of a chapter that fails. The log lines are myst-nb's (cache mode)."""

import importlib.util

import yaml

from chapters import CHAPTERS, ROOT

spec = importlib.util.spec_from_file_location("tasks", ROOT / "tasks.py")
tasks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tasks)
TIMES = yaml.safe_load((ROOT / "chapter_times.yml").read_text(encoding="utf-8"))


def feed(progress, log):
    out = [m for line in log.splitlines() for m in progress.feed(line)]
    return out + progress.close()


def test_every_chapter_has_its_times_and_the_intro_shows_them():
    assert list(TIMES) == CHAPTERS
    intro = (ROOT / "book" / "intro.md").read_text(encoding="utf-8")
    for number, (chapter, t) in enumerate(TIMES.items(), 1):
        assert f"| 第{number}章 | {t['builds']} | {t['cpu']} | {t['gpu']} |" in intro, chapter


def test_announces_each_executed_chapter_with_its_expected_and_measured_time():
    progress = tasks.BuildProgress(CHAPTERS, TIMES, "cpu")
    out = feed(progress, f"""\
/repo/book/{CHAPTERS[2]}.ipynb: Executing notebook using local CWD [mystnb]
some output of the build
/repo/book/{CHAPTERS[2]}.ipynb: Executed notebook in 95.31 seconds [mystnb]
/repo/book/{CHAPTERS[2]}.ipynb: Cached executed notebook: ID=3 [mystnb]
""")
    expected = TIMES[CHAPTERS[2]]["cpu"]
    assert out[0] == f"【進み具合】第3章 {CHAPTERS[2]} を実行しています（cpu プロファイルの目安: {expected}）…"
    assert out[1] == f"【進み具合】第3章 {CHAPTERS[2]}: 95 秒で実行しました"
    assert "実行した章: 1、合計 95 秒" in out[2]


def test_a_failed_chapter_names_its_cell_and_error():
    chapter = CHAPTERS[0]
    progress = tasks.BuildProgress(CHAPTERS, TIMES, "gpu")
    out = feed(progress, f"""\
/repo/book/{chapter}.ipynb: Executing notebook using local CWD [mystnb]
/repo/book/{chapter}.ipynb: WARNING: Executing notebook failed: CellExecutionError [mystnb.exec]
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/jupyter_cache/executors/utils.py", line 58, in single_nb_execution
    executenb(
nbclient.exceptions.CellExecutionError: An error occurred while executing the following cell:
------------------
x = torch.zeros(3)
y = x[5]
------------------

---------------------------------------------------------------------------
IndexError                                Traceback (most recent call last)
Cell In[4], line 2
      1 x = torch.zeros(3)
----> 2 y = x[5]

IndexError: index 5 is out of bounds for dimension 0 with size 3

/repo/book/{chapter}.ipynb: WARNING: Notebook exception traceback saved in: /repo/_build/{chapter}.err.log
""")
    assert out[0].startswith(f"【進み具合】第1章 {chapter} を実行しています（gpu プロファイルの目安: ")
    assert out[1] == f"【失敗】第1章 {chapter} の実行に失敗しました。"
    assert out[2:5] == ["  失敗したセル:", "    x = torch.zeros(3)", "    y = x[5]"]
    assert out[5] == "  エラー: IndexError: index 5 is out of bounds for dimension 0 with size 3"
