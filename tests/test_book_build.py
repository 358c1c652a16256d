"""The book builds with every chapter's outputs (the notebooks as the simulated Colab run executed them in the
smoke profile) and warnings as errors (broken references, TOC entries or MyST syntax fail here), and the pages
have what readers rely on. The build is shared with the browser tests (conftest.built_book)."""

import json
import re

import yaml

from chapters import CHAPTERS, ROOT


def test_strict_build_of_every_chapter_with_its_outputs(built_book):
    assert built_book.returncode == 0, built_book.log[-8000:]
    unexecuted = [c for c, run in built_book.runs.items() if run.returncode != 0 or run.executed is None]
    assert not unexecuted, f"Colab の手順で最後まで実行できなかった章（test_colab を参照）: {unexecuted}"
    html = built_book.html
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    url = config["repository"]["url"].removeprefix("https://github.com/")
    for chapter in CHAPTERS:  # every chapter page: Japanese, with its own Colab button
        page = (html / "book" / f"{chapter}.html").read_text(encoding="utf-8")
        assert 'lang="ja"' in page
        assert f"https://colab.research.google.com/github/{url}/blob/main/book/{chapter}.ipynb" in page
    assert "copybtn" in (html / "_static" / "copybutton.js").read_text(encoding="utf-8")
    raw = (html / "searchindex.js").read_text(encoding="utf-8")
    terms = json.loads(raw[raw.index("(") + 1: raw.rindex(")")])["terms"]
    assert "マルチヘッドアテンション" in terms and "テンソル" in terms  # Japanese text is segmented into words
    assert (html / "index.html").exists()


def test_every_script_once_and_mathjax_from_the_book(built_book):
    """sphinx-thebe and sphinx-togglebutton register their inline scripts twice (_ext/book_html.py
    removes the copies); MathJax is copied into the build instead of loaded from a CDN."""
    page = (built_book.html / "book" / f"{CHAPTERS[0]}.html").read_text(encoding="utf-8")
    assert page.count("const THEBE_JS_URL") == 1 and page.count("var togglebuttonSelector") == 1
    assert "cdn.jsdelivr.net" not in page and "_static/mathjax/tex-chtml.js" in page
    assert (built_book.html / "_static" / "mathjax" / "tex-chtml.js").exists()


def test_plots_are_in_the_pages_and_no_glyph_is_missing(built_book):
    """Every chapter draws at least one figure; matplotlib's "Glyph ... missing from font" (a Japanese label
    drawn without a Japanese font) appears neither in the build log nor in a page."""
    assert not re.search(r"Glyph \d+ .*missing from font", built_book.log)
    for chapter in CHAPTERS:
        page = (built_book.html / "book" / f"{chapter}.html").read_text(encoding="utf-8")
        images = re.findall(r'<img[^>]* src="\.\./(_images/[^"]+\.png)"', page)  # figures the cells drew
        assert images, f"{chapter}: 図がありません"
        assert all((built_book.html / image).stat().st_size > 1000 for image in images), chapter
        assert "missing from font" not in page, chapter
