"""The built book in a real browser: headless Chromium (Debian's package, nothing downloaded) driven by
Playwright over the HTML of conftest.built_book, served from 127.0.0.1.

Every page of _toc.yml loads without console errors or requests to other hosts, is Japanese and
shows its images (the chapters' executed figures among them); each chapter has its Colab and .ipynb
download buttons; the reference solutions are collapsed until the reader opens them; math is typeset
by the MathJax inside the build; Japanese terms typed into the search box find the page that explains
them; every internal link and anchor resolves. Screenshots go to _build/screenshots/ for review.
"""

import functools
import http.server
import re
import shutil
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

from chapters import CHAPTERS, ROOT, toc_files

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INSTALL = "apt-get update && apt-get install -y chromium fonts-noto-cjk"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=f"Chromium がありません（インストール: {INSTALL}）")

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
SCREENSHOTS = ROOT / "_build" / "screenshots"
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")

# A term a reader types → the page that explains it (among the first three pages found). Each is a compound
# that the search index stores only as its parts (機械 / 学習, ...) or as one word on some pages only.
SEARCHES = {
    "機械学習": "book/intro",
    "マルチヘッドアテンション": "book/01_transformer",
    "因果マスク": "book/01_transformer",
    "損失地形": "book/03_sam",
    "量子化": "book/05_quantization",
    "優先度付き経験再生": "book/06_rainbow",
    "強化学習": "book/06_rainbow",
    "勾配チェックポインティング": "book/05_quantization",
}


@pytest.fixture(scope="module")
def site(built_book):
    assert built_book.returncode == 0, built_book.log

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(built_book.html)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, site):
    """A page that records console errors, uncaught exceptions and any request to another host (refused)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"exception: {e}"))

    def only_the_book(route):
        if route.request.url.startswith(site):
            route.continue_()
        else:
            problems.append(f"外部への要求: {route.request.url}")
            route.abort()

    page.route("**/*", only_the_book)
    page.problems = problems
    yield page
    page.close()


def screenshot(page, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


@pytest.mark.parametrize("doc", toc_files())
def test_page_as_a_reader_opens_it(page, site, doc):
    """One visit per page (each costs seconds of a loaded CPU): Japanese, images, no error, and on a
    chapter's page its Colab and download buttons and its collapsed solutions."""
    page.goto(f"{site}/{doc}.html", wait_until="networkidle")
    loads_in_japanese_without_errors(page)
    screenshot(page, Path(doc).name)
    chapter = Path(doc).name
    if chapter in CHAPTERS:
        opens_in_colab_and_downloads_as_a_notebook(page, chapter)
        solutions_are_collapsed_until_the_reader_opens_them(page, chapter)
    assert page.problems == [], page.problems


def loads_in_japanese_without_errors(page):
    assert page.evaluate("document.documentElement.lang") == "ja"
    text = page.locator("article").first.inner_text()
    assert len(JAPANESE.findall(text)) > 200, text[:500]
    broken = page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")
    assert broken == [], broken
    boxes = page.locator("input[name=q]").evaluate_all("bs => bs.map(b => b.placeholder)")
    assert boxes and all(JAPANESE.search(b) for b in boxes), boxes  # the theme's own is "Search..."
    assert page.problems == [], page.problems


def opens_in_colab_and_downloads_as_a_notebook(page, chapter):
    repo = CONFIG["repository"]["url"].removeprefix("https://github.com/")
    branch = CONFIG["repository"].get("branch", "main")
    colab = page.locator('a[href^="https://colab.research.google.com/"]').evaluate_all("as => as.map(a => a.href)")
    assert colab == [f"https://colab.research.google.com/github/{repo}/blob/{branch}/book/{chapter}.ipynb"]
    downloads = page.locator("a.btn-download-source-button").evaluate_all("as => as.map(a => a.href)")
    notebook = [h for h in downloads if h.endswith(f"_sources/book/{chapter}.ipynb")]
    assert len(notebook) == 1, downloads
    assert page.evaluate("url => fetch(url).then(r => r.status)", notebook[0]) == 200


def solutions_are_collapsed_until_the_reader_opens_them(page, chapter):
    source = (ROOT / "lessons_src" / f"{chapter}.md").read_text(encoding="utf-8")
    solutions = len(re.findall(r"^show_solution\(", source, flags=re.M))  # the cells, not the prose mentioning it
    collapsed = page.locator("div.cell.tag_hide-output details.hide")
    assert collapsed.count() == solutions > 0
    assert page.evaluate("[...document.querySelectorAll('div.tag_hide-output details')].every(d => !d.open)")
    for i in (0, solutions - 1):
        details = collapsed.nth(i)
        output = details.locator(".cell_output")
        assert not output.is_visible()
        assert details.locator("summary").inner_text().strip() == "模範解答を表示"
        details.locator("summary").click()
        output.wait_for(state="visible")
        shown = output.inner_text()
        assert "の模範解答" in shown and re.search(r"^\s*(def|class) ", shown, flags=re.M), shown[:300]
        assert details.locator("summary").inner_text().strip() == "模範解答を隠す"
    if chapter == CHAPTERS[0]:
        details.scroll_into_view_if_needed()
        screenshot(page, "solution-opened")


def test_math_is_typeset_by_the_mathjax_in_the_build(page, site):
    page.goto(f"{site}/book/{CHAPTERS[0]}.html", wait_until="networkidle")
    page.wait_for_selector("mjx-container", timeout=20_000)
    assert page.locator("mjx-container").count() > 10
    assert page.locator("mjx-merror").count() == 0  # no TeX that MathJax could not parse
    assert page.problems == [], page.problems


def search_as_a_reader(page, site, query) -> list[str]:
    """Open the search from the intro page's search button, type, press Enter; the pages found, in order."""
    page.goto(f"{site}/book/intro.html", wait_until="load")
    page.locator("button.search-button__button:visible").first.click()
    box = page.locator("input[name=q]:visible").first
    box.fill(query)
    box.press("Enter")
    page.wait_for_url("**/search.html?*")
    page.wait_for_function("typeof Search !== 'undefined' && Search.title"
                           " && Search.title.innerText === Documentation.gettext('Search Results')", timeout=30_000)
    hrefs = page.locator("#search-results ul.search li > a").evaluate_all("as => as.map(a => a.getAttribute('href'))")
    pages = []
    for href in hrefs:
        doc = href.split("#")[0].removesuffix(".html")
        if doc not in pages:
            pages.append(doc)
    return pages


@pytest.mark.parametrize("query,expected", SEARCHES.items())
def test_japanese_search_finds_the_page_that_explains_it(page, site, query, expected):
    pages = search_as_a_reader(page, site, query)
    assert expected in pages[:3], f"「{query}」: {pages}"
    summary = page.locator("#search-results .search-summary").inner_text()
    found = page.locator("#search-results ul.search li").count()
    assert summary == f"検索が終わりました。{found} ページが見つかりました。"  # Sphinx's own ja text is empty
    assert page.problems == [], page.problems
    if query == next(iter(SEARCHES)):
        screenshot(page, "search")


def test_the_stock_search_could_not_find_a_compound_japanese_term(page, site):
    """Why assets/ja_search.js exists: the index has 機械 and 学習 but not 機械学習, which the stock
    splitter (spaces and punctuation only) leaves whole; the book's splitter gives the index's words."""
    page.goto(f"{site}/search.html?q=", wait_until="networkidle")
    page.wait_for_function("typeof Search !== 'undefined' && Search._index !== null")
    index_has = page.evaluate("w => w in Search._index.terms || w in Search._index.titleterms", "機械学習")
    stock = page.evaluate(r"q => q.split(/[^\p{Letter}\p{Number}_\p{Emoji_Presentation}]+/gu).filter(t => t)",
                          "機械学習")
    assert not index_has and stock == ["機械学習"]
    assert page.evaluate("q => splitQuery(q)", "機械学習") == ["機械", "学習"]
    # Latin words stay as typed; a particle that no word of the index covers is dropped from a Japanese run
    assert page.evaluate("q => splitQuery(q)", "SAM の損失地形") == ["SAM", "損失", "地形"]


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.hrefs = set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        if tag == "a" and attrs.get("href"):
            self.hrefs.append(attrs["href"])


def test_every_internal_link_and_anchor_resolves(built_book):
    html = built_book.html
    pages = {p: _Links() for p in [*html.glob("*.html"), *html.glob("book/*.html")]}
    for path, parser in pages.items():
        parser.feed(path.read_text(encoding="utf-8"))
    broken = []
    for path, parser in pages.items():
        for href in parser.hrefs:
            url = urlparse(href)
            if url.scheme or href.startswith(("mailto:", "javascript:")):
                continue
            target = (path.parent / unquote(url.path)).resolve() if url.path else path
            if not target.exists():
                broken.append(f"{path.relative_to(html)}: {href}")
            elif url.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _ids_of(target)
                if unquote(url.fragment) not in ids:
                    broken.append(f"{path.relative_to(html)}: {href}（アンカーがありません）")
    assert broken == [], "\n".join(broken)


def _ids_of(path):
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.ids
