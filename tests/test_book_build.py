"""The book builds without executing notebooks, with warnings as errors (broken references,
TOC entries or MyST syntax fail here), and the page has what readers rely on. The build is
shared with the browser tests (conftest.built_book)."""

import json

import yaml

from chapters import CHAPTERS, ROOT


def test_strict_build_without_execution(built_book):
    assert built_book.returncode == 0, built_book.log
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
