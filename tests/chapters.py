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
from myst_parser.mdit_to_docutils.base import default_slugify

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


# A chapter's sections, as the glossary and the closing page link to them (MyST heading anchors).
def plain(title: str) -> str:
    """A heading's text as rendered (the text MyST makes its anchor from)."""
    title = re.sub(r"`([^`]*)`", r"\1", title)
    return re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).strip()


def sections(chapter: str) -> list[dict]:
    """The chapter's headings in order: level, title, MyST anchor, and the prose under it (code cells left out)."""
    out, in_code, seen = [], False, set()
    for line in source_path(chapter).read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        if m := re.match(r"(#{1,6}) (.*)$", line):
            title = plain(m[2])
            slug = base = default_slugify(title)
            i = 1
            while slug in seen:
                slug, i = f"{base}-{i}", i + 1
            seen.add(slug)
            out.append({"level": len(m[1]), "title": title, "slug": slug, "lines": [title]})
        elif out:
            out[-1]["lines"].append(line)
    return out


def section_text(chapter: str, anchor: str | None) -> str | None:
    """The text of the section the anchor names, its subsections included (no anchor: the chapter's opening)."""
    secs = sections(chapter)
    start = 0 if anchor is None else next((i for i, s in enumerate(secs) if s["slug"] == anchor), None)
    if start is None:
        return None
    end = next((j for j in range(start + 1, len(secs)) if secs[j]["level"] <= secs[start]["level"]), len(secs))
    if anchor is None:
        end = 1
    text = "\n".join(line for s in secs[start:end] for line in s["lines"])
    return re.sub(r"\$\\alpha\$", "α", text).replace("`", "")
