/*
 * 日本語の検索語を、検索索引と同じ単位に分ける（_config.yml の html_js_files で全ページに読み込む）。
 *
 * Sphinx は本文を形態素に分けて索引を作る（html_search_language: ja）が、検索ボックスに入れた語は
 * 空白と記号でしか分けない。そのため「機械学習」は、索引の「機械」「学習」のどちらとも一致せず、
 * 何も見つからない。ここでは、かな・漢字を含む語を、読み込んだ索引に実際にある語の並びに分け直す
 * （索引の語で覆えない文字はできるだけ少なく、そのうえで語の数はできるだけ少なく）。分けた語は
 * Sphinx の検索ですべて含むページだけが結果になるので、語を分けても結果が広がりすぎることはない。
 *
 * searchtools.js は splitQuery が定義済みならそれを使う。このファイルは searchtools.js より先に
 * 読み込まれる。
 */
"use strict";

var splitQuery = (() => {
  // Sphinx の既定の分け方と同じ（Python の \W+ で分ける）
  const splitOnNonWords = (query) =>
    query.split(/[^\p{Letter}\p{Number}_\p{Emoji_Presentation}]+/gu).filter((term) => term);
  const japanese = /[\p{Script=Han}\p{Script=Hiragana}\p{Script=Katakana}ー々]/u;

  let indexSeen = null;
  let words = new Set();
  let longest = 0;

  // 索引の語（本文と見出し）。索引は非同期に読み込まれるので、検索のたびに差し替わっていないかを見る
  const vocabulary = () => {
    const index = typeof Search !== "undefined" ? Search._index : null;
    if (index && index !== indexSeen) {
      indexSeen = index;
      words = new Set([...Object.keys(index.terms || {}), ...Object.keys(index.titleterms || {})]);
      longest = Math.max(0, ...[...words].map((w) => w.length));
    }
    return words;
  };

  // 動的計画法: best[i] は先頭から i 文字を分けた最良の分け方（覆えない文字の数、語の数の順に小さい）
  const segment = (token, known) => {
    const text = token.toLowerCase();
    const n = text.length;
    const best = Array(n + 1).fill(null);
    best[0] = { skipped: 0, pieces: 0, from: -1, word: null };
    const relax = (to, skipped, pieces, from, word) => {
      const b = best[to];
      if (!b || skipped < b.skipped || (skipped === b.skipped && pieces > b.pieces)) {
        best[to] = { skipped, pieces, from, word };
      }
    };
    for (let i = 0; i < n; i++) {
      const here = best[i];
      if (!here) continue;
      relax(i + 1, here.skipped + 1, here.pieces, i, null); // この 1 文字は索引の語で覆えない
      for (let len = 1; len <= Math.min(longest, n - i); len++) {
        const piece = text.slice(i, i + len);
        if (known.has(piece)) relax(i + len, here.skipped, here.pieces + 1, i, piece);
      }
    }
    const pieces = [];
    for (let at = n; at > 0; at = best[at].from) {
      if (best[at].word) pieces.unshift(best[at].word);
    }
    return pieces;
  };

  return (query) => {
    const known = vocabulary();
    return splitOnNonWords(query).flatMap((token) => {
      if (!japanese.test(token) || known.size === 0 || known.has(token.toLowerCase())) return [token];
      const pieces = segment(token, known);
      return pieces.length > 0 ? pieces : [token];
    });
  };
})();

/*
 * Sphinx 7.4 の日本語の翻訳では、検索結果の件数の文（"Search finished, found ${resultCount} page(s) ..."）が
 * 空文字列なので、結果の上の件数の行が空になる。translations.js はこのファイルより先に読み込まれるので、
 * ここで空の訳だけを埋める。テーマの検索ボックスの英語の placeholder（"Search..."）も日本語にする。
 */
(() => {
  const found = "Search finished, found ${resultCount} page(s) matching the search query.";
  if (typeof Documentation !== "undefined" && Documentation.TRANSLATIONS && !Documentation.TRANSLATIONS[found]) {
    Documentation.TRANSLATIONS[found] = "検索が終わりました。${resultCount} ページが見つかりました。";
  }
  const placeholders = () =>
    document.querySelectorAll('input[name="q"][placeholder="Search..."]').forEach((box) => {
      box.placeholder = "本書を検索…";
    });
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", placeholders);
  else placeholders();
})();
