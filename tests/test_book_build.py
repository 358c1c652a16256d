"""The book builds without executing notebooks, with warnings as errors (broken references,
TOC entries or MyST syntax fail here), and the page has what readers rely on."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from chapters import CHAPTERS

ROOT = Path(__file__).resolve().parents[1]


def test_strict_build_without_execution(tmp_path):
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    config["execute"]["execute_notebooks"] = "off"
    config_path = tmp_path / "_config.yml"
    config_path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    result = subprocess.run(
        [str(jupyter_book), "build", str(ROOT), "--config", str(config_path), "--path-output", str(tmp_path),
         "-W", "--keep-going", "--all"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    html = tmp_path / "_build" / "html"
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
