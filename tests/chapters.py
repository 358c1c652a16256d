"""The chapters the tests enrol: every chapter listed in _toc.yml, nothing else.

A chapter ``NN_topic`` is ``book/NN_topic.ipynb`` paired with ``lessons_src/NN_topic.md``;
its exercises are registered by a module of ``solutions.exercises`` whose ``CHAPTER`` is
``"NN_topic"``, and its answer cases for the checker live in ``tests/answers/NN_topic.py``.
Adding the chapter's line to ``_toc.yml`` enrols it in every chapter-generic test.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
CHAPTER_FILE = re.compile(r"book/(\d\d_\w+)")


def toc_files() -> list[str]:
    """Every file the table of contents lists, the root page first."""
    return [TOC["root"]] + [entry["file"] for entry in TOC.get("chapters", [])]


def chapters() -> list[str]:
    """The chapter names (``01_transformer``, ...) in the order of _toc.yml."""
    return [m[1] for f in toc_files() if (m := CHAPTER_FILE.fullmatch(f))]


CHAPTERS = chapters()


def notebook_path(chapter: str) -> Path:
    return ROOT / "book" / f"{chapter}.ipynb"


def source_path(chapter: str) -> Path:
    return ROOT / "lessons_src" / f"{chapter}.md"


def answers_path(chapter: str) -> Path:
    return ROOT / "tests" / "answers" / f"{chapter}.py"


def load_answers(chapter: str):
    """The chapter's answer cases module (``CORRECT`` and ``WRONG``), or None when it has none."""
    path = answers_path(chapter)
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"answers_{chapter}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
