"""The glossary page (book/glossary.md) and the chapters agree.

- Every row links to the section of a chapter that explains the term, and that section uses each Japanese
  form of the row (the anchors are MyST heading anchors; test_browser checks that they resolve in the HTML).
- Every term a chapter introduces with its English in parentheses, ``日本語（english）``, has a row.
- The known bad renderings (calques and variants the glossary rules out) appear nowhere in the book's text:
  the chapters, the pages, and the package's messages and plot labels. Each hit is reported with file and line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chapters import CHAPTERS, ROOT, plain, section_text, sections, source_path

GLOSSARY = ROOT / "book" / "glossary.md"
LINK = re.compile(r"\[([^\]]+)\]\((\d\d_\w+)\.ipynb(?:#([^)\s]+))?\)")

# (pattern, the book's form, the English it renders). A pattern names the mistake, not a word that merely
# contains the same characters: 先頭 and 頭打ち are ordinary Japanese, 二重量子化 contains 重量.
BAD_RENDERINGS = [
    (r"(?<![先冒念口])頭(?!打ち|文字)", "ヘッド", "head"),
    (r"機能", "特徴（feature）。「働き」の意味でも本書では使いません", "feature"),
    (r"注意機構|自己注意|注意の重み|注意重み|多頭注意|マルチヘッド注意", "アテンション", "attention"),
    (r"アテンション重み|アテンションウェイト", "アテンションの重み", "attention weights"),
    (r"(?<!二)重量", "重み", "weights"),
    (r"残差の流れ", "残差ストリーム", "residual stream"),
    (r"方針|政策", "方策", "policy"),
    (r"優先順位付き|経験リプレイ|リプレイメモリ", "優先度付き経験再生 / リプレイバッファ",
     "prioritized experience replay / replay buffer"),
    (r"勾配チェックポイント(?!ィング)", "勾配チェックポインティング", "gradient checkpointing"),
    (r"レイヤー?正規化|層の正規化", "層正規化", "layer normalization"),
    (r"位置符号化|位置エンコード(?!ィング)", "位置エンコーディング", "positional encoding"),
    (r"因果的マスク|因果マスキング", "因果マスク", "causal mask"),
    (r"損失(?:ランドスケープ|景観|曲面)", "損失地形", "loss landscape"),
    (r"分布強化学習|分布的強化学習", "分布型強化学習", "distributional RL"),
    (r"決闘|ノイズの多いネットワーク", "デュエリングネットワーク / ノイジーネットワーク", "dueling / noisy network"),
    (r"剪定", "枝刈り", "pruning"),
    (r"二層最適化|二重最適化|バイレベル最適化", "二段階最適化", "bilevel optimization"),
    (r"ジェノタイプ", "遺伝子型", "genotype"),
    (r"優位関数|優位性関数|一般化優位", "アドバンテージ", "advantage"),
    (r"スーパーネットワーク", "スーパーネット", "supernet"),
    (r"活性化(?!関数)", "活性値（activation function は活性化関数）", "activation"),
    (r"クエリー|バリュ(?!ー)", "クエリ / バリュー", "query / value"),
    (r"シャープネス", "鋭さ", "sharpness"),
    (r"平らな最小値|フラットな最小値", "平坦な最小値", "flat minimum"),
    (r"パラメーター", "パラメータ", "parameter"),
    (r"埋込", "埋め込み", "embedding"),
    (r"(?<![ア-ン])リターン", "収益", "return"),
    (r"混合精密", "混合精度", "mixed precision"),
    (r"逆伝搬", "逆伝播", "backpropagation"),
    (r"低ランク適合", "低ランク適応", "low-rank adaptation"),
    (r"[12] ?次近似", "一次近似 / 二次近似", "first-order / second-order approximation"),
    (r"方策オ[フン](?!型)", "方策オフ型 / 方策オン型", "off-policy / on-policy"),
]

# English in parentheses after Japanese that names no term of the book: a data set, a type, a code value.
NOT_TERMS = {"digits", "bool", "math"}


def book_text_files() -> list[Path]:
    """The text the reader sees: the chapters (their MyST source), the pages, the package's messages and labels."""
    return ([source_path(c) for c in CHAPTERS] + sorted((ROOT / "book").glob("*.md"))
            + sorted((ROOT / "solutions").rglob("*.py")))


def bad_renderings(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for pattern, right, english in BAD_RENDERINGS:
                for m in re.finditer(pattern, line):
                    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                    found.append(f"{where}:{number}: 「{m.group(0)}」→ 本書では「{right}」（{english}）")
    return found


def glossary_rows() -> list[tuple[int, str, str, str]]:
    """(line, Japanese, English, link cell) of every row of the glossary's tables."""
    rows = []
    for number, line in enumerate(GLOSSARY.read_text(encoding="utf-8").splitlines(), start=1):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) == 3 and not set(cells[0]) <= set("-: ") and cells[0] != "本書での表記":
            rows.append((number, *cells))
    return rows


def forms(japanese: str) -> list[str]:
    """The forms a row fixes: its Japanese cell split at " / ", notes in parentheses left out."""
    japanese = re.sub(r"（[^）]*）|\([^)]*\)", "", japanese)
    return [f.strip() for f in japanese.split(" / ") if f.strip()]


def test_the_glossary_has_rows_for_every_chapter():
    rows = glossary_rows()
    assert len(rows) >= 150
    linked = {m[2] for _, _, _, link in rows if (m := LINK.search(link))}
    assert linked == set(CHAPTERS)


def test_every_row_links_to_a_section_that_uses_its_forms():
    problems = []
    for number, japanese, _english, link in glossary_rows():
        where = f"book/glossary.md:{number}（{japanese}）"
        m = LINK.fullmatch(link)
        if not m or m[2] not in CHAPTERS:
            problems.append(f"{where}: 説明している節へのリンクがありません: {link}")
            continue
        text = section_text(m[2], m[3])
        if text is None:
            problems.append(f"{where}: {m[2]} に節 #{m[3]} がありません")
            continue
        if m[3] and plain(m[1]) != next(s["title"] for s in sections(m[2]) if s["slug"] == m[3]):
            problems.append(f"{where}: リンクの文字 {m[1]!r} が節の見出しと違います")
        problems += [f"{where}: 節 {m[1]} に「{f}」が出てきません" for f in forms(japanese) if f not in text]
    assert not problems, "\n".join(problems)


def test_every_term_a_chapter_introduces_is_in_the_glossary():
    english = " ".join(e.lower() for _, _, e, _ in glossary_rows())
    introduced = re.compile(r"([\u3040-\u30ff\u4e00-\u9fff・ー]+)（([a-z][a-z \-]+)(?:[、,][^）]*)?）")
    missing = []
    for chapter in CHAPTERS:
        for number, line in enumerate(source_path(chapter).read_text(encoding="utf-8").splitlines(), start=1):
            for m in introduced.finditer(line):
                term = m[2].strip()
                if term not in NOT_TERMS and term not in english and term.removesuffix("s") not in english:
                    missing.append(f"lessons_src/{chapter}.md:{number}: {m[1]}（{term}）")
    assert not missing, "用語集にない用語:\n" + "\n".join(missing)


def test_no_bad_rendering_in_the_book():
    found = bad_renderings(book_text_files())
    assert not found, "用語集の訳語と違う書き方:\n" + "\n".join(found)


def test_bad_renderings_are_reported_with_file_and_line(tmp_path):
    text = tmp_path / "chapter.md"
    text.write_text("先頭の行です。正解率は頭打ちになります。\n各頭の出力を結合し、機能マップを作ります。\n"
                    "活性化関数の前の活性値と、二重量子化。\n活性化の統計を見ます。\n", encoding="utf-8")
    found = bad_renderings([text])
    assert [f.split(": ", 1)[0] for f in found] == [f"{text}:2", f"{text}:2", f"{text}:4"]
    assert "「頭」→ 本書では「ヘッド」（head）" in found[0] and "「機能」" in found[1] and "活性値" in found[2]


@pytest.mark.parametrize("japanese, expected", [
    ("サンプラー / 枝刈り (pruner) / トライアル", ["サンプラー", "枝刈り", "トライアル"]),
    ("層正規化 (Pre-LN / Post-LN)", ["層正規化"]),
    ("最適化の方向（最大化 / 最小化）", ["最適化の方向"]),
])
def test_forms_leave_out_the_notes(japanese, expected):
    assert forms(japanese) == expected


def test_a_row_whose_section_does_not_use_the_term_is_reported():
    secs = sections("01_transformer")
    causal = next(s for s in secs if "因果マスク" in s["title"] and s["level"] == 2)
    assert "因果マスク" in section_text("01_transformer", causal["slug"])
    assert "優先度付き経験再生" not in section_text("01_transformer", causal["slug"])
    assert section_text("01_transformer", "no-such-section") is None
