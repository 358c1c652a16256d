"""The book's pages besides the chapters: the closing map (book/summary.md) and the links of every page.

Links from a page into a chapter use MyST heading anchors (``01_transformer.ipynb#2-因果マスク``); here they are
resolved against the chapters' headings, so a renamed section fails with the page and line (test_browser checks
the same links again in the built HTML).
"""

from __future__ import annotations

import re

import pytest

from chapters import CHAPTERS, ROOT, section_text, toc_files

SUMMARY = ROOT / "book" / "summary.md"
CHAPTER_LINK = re.compile(r"\]\((\d\d_\w+)\.ipynb(?:#([^)\s]+))?\)")

# What the closing page must cover (the seed lesson's summary, as a map): for each checklist, each topic is an
# item "- **topic**: ..." whose first link leads to a section that uses the word in the right-hand column.
CHECKLISTS = {
    "速さとメモリのチェックリスト": {"混合精度": "混合精度", "勾配チェックポインティング": "勾配チェックポインティング",
                    "並列": "並列", "効率的なアテンション": "scaled_dot_product_attention"},
    "デバッグのチェックリスト": {"勾配の流れ": "勾配", "活性値の統計": "活性値", "損失地形": "損失地形",
                      "アテンションの重み": "アテンションの重み"},
}


def page_sections(text: str) -> dict[str, str]:
    """The '## ' sections of a page by heading."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_summary_page_is_in_the_table_of_contents_before_the_glossary():
    files = toc_files()
    assert "book/summary" in files
    assert files.index("book/summary") == files.index(f"book/{CHAPTERS[-1]}") + 1
    assert files.index("book/glossary") > files.index("book/summary")


@pytest.mark.parametrize("page", sorted((ROOT / "book").glob("*.md")), ids=lambda p: p.name)
def test_links_from_pages_into_chapters_lead_to_a_section(page):
    problems = []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        for m in CHAPTER_LINK.finditer(line):
            if m[1] not in CHAPTERS:
                problems.append(f"book/{page.name}:{number}: 章 {m[1]} は _toc.yml にありません")
            elif m[2] and section_text(m[1], m[2]) is None:
                problems.append(f"book/{page.name}:{number}: {m[1]} に節 #{m[2]} がありません")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("checklist", CHECKLISTS)
def test_each_checklist_topic_links_to_the_section_that_builds_it(checklist):
    items = page_sections(SUMMARY.read_text(encoding="utf-8"))[checklist]
    for topic, word in CHECKLISTS[checklist].items():
        item = re.search(rf"^- \*\*{re.escape(topic)}\*\*: (.+)$", items, flags=re.M)
        assert item, f"{checklist} に「{topic}」の項目がありません"
        links = CHAPTER_LINK.findall(item[1])
        assert links, f"{checklist} の「{topic}」に節へのリンクがありません"
        chapter, anchor = links[0]
        text = section_text(chapter, anchor or None)
        assert word in text, f"「{topic}」のリンク先 {chapter}#{anchor} に「{word}」がありません"


def test_the_map_of_techniques_links_every_chapter():
    table = page_sections(SUMMARY.read_text(encoding="utf-8"))["本書で作った技術"]
    assert {m[1] for m in CHAPTER_LINK.finditer(table)} == set(CHAPTERS)


def test_the_summary_points_to_the_original_papers():
    papers = page_sections(SUMMARY.read_text(encoding="utf-8"))["この先へ: 元の論文"]
    cited = re.findall(r"<https://[^>]+>", papers)
    assert len(cited) >= len(CHAPTERS)
    references = "".join(
        re.split(r"^## 参考文献$", (ROOT / "lessons_src" / f"{c}.md").read_text(encoding="utf-8"), flags=re.M)[-1]
        for c in CHAPTERS)
    # every arXiv paper listed here is one a chapter cites in its references
    for arxiv in re.findall(r"arxiv\.org/abs/([\d.]+)", papers):
        assert arxiv in references, f"arXiv {arxiv} はどの章の参考文献にもありません"
