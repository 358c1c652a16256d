"""Chapter 1's exercises: their registrations and the tests that grade a reader's answer.

Each test compares the answer with the reference on random and edge inputs and, where a
well-known mistake can be recognised by its output, names it in Japanese.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checker import (
    CheckFailed,
    call_without_mutation,
    copy_reference_parameters,
    expect_close,
    expect_tensor,
    expect_tuple,
    register,
)
from ..transformer import (
    MultiHeadAttention,
    TransformerBlock,
    causal_mask,
    scaled_dot_product_attention,
    sinusoidal_positional_encoding,
)

CHAPTER = "01_transformer"

_HINT_ATTENTION = (
    "よくある原因: 1/√d のスケーリング忘れ、softmax の軸（キーの軸 dim=-1 で正規化します）、"
    "マスクの向き（True が「見てよい」位置です）。"
)


def _attention_variants(q, k, v, mask):
    """Outputs of well-known wrong versions, to name the likely mistake."""
    d = q.size(-1)

    def attend(scores, dim=-1, invert=False):
        if mask is not None:
            m = mask if invert else ~mask
            scores = scores.masked_fill(m, torch.finfo(scores.dtype).min)
        return scores.softmax(dim) @ v

    raw = q @ k.transpose(-2, -1)
    variants = {
        "1/√d のスケーリングがありません。": attend(raw),
        "√d ではなく d で割っています。": attend(raw / d),
        "softmax の軸が違います（dim=-2 ではなく dim=-1、キーの軸で正規化します）。":
            attend(raw / math.sqrt(d), dim=-2),
    }
    if mask is not None:
        variants["マスクの向きが逆です（True が「見てよい」位置です。masked_fill には ~mask を渡します）。"] = attend(
            raw / math.sqrt(d), invert=True)
        w = (raw / math.sqrt(d)).softmax(-1) * mask
        variants["マスクを softmax の後に掛けています（各行の和が 1 になりません）。"] = w @ v
    return variants


def _check_attention_case(answer, ref, shape_q, shape_k, mask=None, dtype=torch.float32, d_v=None, device="cpu"):
    q = torch.randn(*shape_q, dtype=dtype, device=device)
    k = torch.randn(*shape_k, dtype=dtype, device=device)
    v = torch.randn(*shape_k[:-1], d_v or shape_k[-1], dtype=dtype, device=device)
    result = call_without_mutation(answer, q, k, v, mask)
    out, weights = expect_tuple(result, "戻り値 (output, weights)", 2)
    ref_out, ref_w = ref(q, k, v, mask)
    expect_tensor(out, "output", shape=ref_out.shape, dtype=dtype)
    expect_tensor(weights, "weights", shape=ref_w.shape, dtype=dtype)
    if not torch.allclose(out, ref_out, atol=1e-5, rtol=1e-4):
        for reason, wrong in _attention_variants(q, k, v, mask).items():
            if torch.allclose(out, wrong, atol=1e-5, rtol=1e-4):
                raise CheckFailed(f"output が模範解答と一致しません。原因: {reason}")
    expect_close(out, ref_out, "output", hint=_HINT_ATTENTION)
    expect_close(weights, ref_w, "weights", hint="weights には softmax 後の確率（dropout 前）を返してください。")


def _register_attention():
    ex = register("scaled_dot_product_attention", "スケール化ドット積アテンション", chapter=CHAPTER,
                  reference=scaled_dot_product_attention)

    @ex.test("マスクなし・4 次元入力 (B, H, T, d)")
    def _(answer, ref):
        _check_attention_case(answer, ref, (2, 3, 5, 8), (2, 3, 5, 8))

    @ex.test("各行のアテンションの重みが確率（0 以上で和が 1）になっている")
    def _(answer, ref):
        q, k, v = (torch.randn(2, 4, 6) for _ in range(3))
        _, w = expect_tuple(answer(q, k, v), "戻り値 (output, weights)", 2)
        expect_tensor(w, "weights", shape=(2, 4, 4))
        if (w < 0).any():
            raise CheckFailed("weights に負の値があります。softmax を通した確率を返してください。")
        expect_close(w.sum(-1), torch.ones(2, 4), "weights の行和",
                     hint="softmax はキーの軸（dim=-1）に沿って取ります。")

    @ex.test("クエリとキーの長さが違う (T_q=3, T_k=7) 3 次元入力")
    def _(answer, ref):
        _check_attention_case(answer, ref, (2, 3, 8), (2, 7, 8))

    @ex.test("因果マスク (T, T) をバッチとヘッドにブロードキャストする")
    def _(answer, ref):
        mask = causal_mask(6)
        _check_attention_case(answer, ref, (2, 2, 6, 4), (2, 2, 6, 4), mask)
        _, w = answer(torch.randn(1, 6, 4), torch.randn(1, 6, 4), torch.randn(1, 6, 4), mask)
        if w[..., ~mask].abs().max() > 1e-6:
            raise CheckFailed("マスクで禁止した位置（未来のトークン）に 0 でないアテンションの重みがあります。")

    @ex.test("パディングマスク (B, 1, 1, T_k)")
    def _(answer, ref):
        mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
        mask[0, ..., 3:] = False  # the first sequence has two padding positions
        _check_attention_case(answer, ref, (2, 3, 4, 8), (2, 3, 5, 8), mask)

    @ex.test("バッチ 1・長さ 1・奇数の次元、float64 のまま計算する")
    def _(answer, ref):
        _check_attention_case(answer, ref, (1, 1, 1, 5), (1, 1, 1, 5), dtype=torch.float64)
        _check_attention_case(answer, ref, (1, 7, 5), (1, 7, 5), causal_mask(7), dtype=torch.float64)

    @ex.test("バリューの次元がクエリ・キーと違う (d=8, d_v=3)")
    def _(answer, ref):
        _check_attention_case(answer, ref, (2, 4, 8), (2, 6, 8), d_v=3)

    @ex.test("float16 のまま計算する（混合精度や GPU の float16 で使うため）")
    def _(answer, ref):
        q, k, v = (torch.randn(2, 2, 6, 8, dtype=torch.float16) for _ in range(3))
        mask = causal_mask(6)
        try:
            result = call_without_mutation(answer, q, k, v, mask)
        except RuntimeError as e:
            if "overflow" not in str(e):
                raise
            raise CheckFailed("マスクした位置に入れた値が float16 では表せません（float16 の絶対値の最大は 65504）。"
                              "-1e9 などの定数ではなく torch.finfo(scores.dtype).min を使ってください。") from None
        out, w = expect_tuple(result, "戻り値 (output, weights)", 2)
        ref_out, ref_w = ref(q.double(), k.double(), v.double(), mask)
        expect_tensor(out, "float16 の output", shape=ref_out.shape, dtype=torch.float16)
        expect_close(out, ref_out.half(), "float16 の output", atol=1e-2, rtol=1e-2)
        expect_close(w, ref_w.half(), "float16 の weights", atol=1e-2, rtol=1e-2)

    @ex.gpu_test
    def _(answer, ref, device):
        _check_attention_case(answer, ref, (2, 2, 6, 8), (2, 2, 6, 8), causal_mask(6, device=device), device=device)


def _register_causal_mask():
    ex = register("causal_mask", "因果マスク", chapter=CHAPTER, reference=causal_mask)

    @ex.test("形状・dtype・値が模範解答と一致する")
    def _(answer, ref):
        for T in (1, 2, 5, 8):
            m = answer(T)
            expect_tensor(m, f"causal_mask({T})", shape=(T, T), dtype=torch.bool, device="cpu")
            expected = ref(T)
            if not torch.equal(m, expected):
                if torch.equal(m, ~expected):
                    why = "True と False が逆です。True が「見てよい」位置（対角とその左下）です。"
                elif torch.equal(m, expected.T):
                    why = "上三角になっています。位置 i が見てよいのは 0..i（下三角）です。"
                elif torch.equal(m, expected.tril(-1)):
                    why = "対角が False です。自分自身の位置は見てよい位置に含めます。"
                else:
                    why = f"T={T} で値が違います。期待値:\n{expected.int()}"
                raise CheckFailed(why)

    @ex.test("device 引数で指定したデバイスに作る")
    def _(answer, ref):
        m = answer(4, device=torch.device("cpu"))
        expect_tensor(m, "causal_mask(4, device=cpu)", shape=(4, 4), dtype=torch.bool, device="cpu")
        # "meta" tensors have a shape but no data: any device argument that is passed on shows here.
        m = answer(4, device="meta")
        expect_tensor(m, 'causal_mask(4, device="meta")', shape=(4, 4), dtype=torch.bool, device="meta")


def _register_positional_encoding():
    ex = register("sinusoidal_positional_encoding", "正弦波の位置エンコーディング", chapter=CHAPTER,
                  reference=sinusoidal_positional_encoding)

    @ex.test("形状・dtype・値が模範解答と一致する")
    def _(answer, ref):
        for max_len, d in ((50, 16), (1, 4), (7, 6)):
            pe = answer(max_len, d)
            expected = ref(max_len, d)
            expect_tensor(pe, f"PE({max_len}, {d})", shape=(max_len, d), dtype=torch.float32)
            if torch.allclose(pe, expected, atol=1e-5):
                continue
            swapped = torch.stack([expected[:, 1::2], expected[:, 0::2]], -1).flatten(1)
            concat = torch.cat([expected[:, 0::2], expected[:, 1::2]], 1)
            if torch.allclose(pe, swapped, atol=1e-5):
                raise CheckFailed("sin と cos が逆です。偶数番目の次元 (2i) が sin、奇数番目 (2i+1) が cos です。")
            if torch.allclose(pe, concat, atol=1e-5):
                raise CheckFailed("sin を前半、cos を後半にまとめています。"
                                  "原論文どおり偶数次元と奇数次元に交互に入れてください。")
            expect_close(pe, expected, f"PE({max_len}, {d})", atol=1e-5,
                         hint="周波数は 1/10000^(2i/d_model) です（i ではなく 2i、底は 10000）。")

    @ex.test("位置 0 の行は [0, 1, 0, 1, ...]")
    def _(answer, ref):
        pe = answer(3, 8)
        expect_close(pe[0], torch.tensor([0.0, 1.0] * 4), "PE[0]")


def _in_train_mode(module, *inputs):
    """The module's output in training mode (dropout active), without building a graph."""
    module.train()
    with torch.no_grad():
        return module(*inputs)


def _copy_projections(src, dst):
    for name in ("W_q", "W_k", "W_v", "W_o"):
        s, d = getattr(src, name), getattr(dst, name, None)
        if not isinstance(d, nn.Linear):
            raise CheckFailed(f"self.{name} が nn.Linear ではありません（{type(d).__name__}）。")
        if d.bias is None:
            raise CheckFailed(f"self.{name} にバイアスがありません。"
                              "nn.Linear(d_model, d_model) のまま（bias=True）にしてください。")
        if d.weight.shape != s.weight.shape:
            raise CheckFailed(f"self.{name}.weight の形状は {tuple(s.weight.shape)} のはずですが、"
                              f"{tuple(d.weight.shape)} でした。")
        with torch.no_grad():
            d.weight.copy_(s.weight)
            d.bias.copy_(s.bias)


def _mha_pair(answer, ref, d_model=16, n_heads=4, dropout=0.0, device="cpu"):
    theirs = answer(d_model, n_heads, dropout=dropout)
    ours = ref(d_model, n_heads, dropout=dropout)
    _copy_projections(ours, theirs)
    return theirs.to(device).eval(), ours.to(device).eval()


def _heads_not_transposed(mha, query, key, value, mask):
    """The classic bug: view(B, H, T, d_head) straight away, without transpose(1, 2)."""
    B, T_q, D = query.shape
    split = lambda x: x.reshape(B, mha.n_heads, -1, mha.d_head)  # noqa: E731
    out, _ = scaled_dot_product_attention(split(mha.W_q(query)), split(mha.W_k(key)), split(mha.W_v(value)), mask)
    candidates = [out.transpose(1, 2).reshape(B, T_q, D), out.reshape(B, T_q, D)]
    return [mha.W_o(c) for c in candidates]


def _check_mha_case(answer, ref, B, T_q, T_k, mask=None, self_attention=False, device="cpu"):
    theirs, ours = _mha_pair(answer, ref, device=device)
    query = torch.randn(B, T_q, 16, device=device)
    key = query if self_attention else torch.randn(B, T_k, 16, device=device)
    value = query if self_attention else torch.randn(B, T_k, 16, device=device)
    with torch.no_grad():
        result = call_without_mutation(theirs, query, key, value, mask)
        out, w = expect_tuple(result, "戻り値 (output, weights)", 2)
        ref_out, ref_w = ours(query, key, value, mask)
    expect_tensor(out, "output", shape=ref_out.shape)
    if w is None or (isinstance(w, torch.Tensor) and w.dim() == 3):
        raise CheckFailed(f"weights の形状は (B, H, T_q, T_k) = {tuple(ref_w.shape)} のはずです。"
                          "ヘッドごとのアテンションの重みを平均せずに返してください。")
    expect_tensor(w, "weights", shape=ref_w.shape)
    if not torch.allclose(out, ref_out, atol=1e-5, rtol=1e-4):
        added = ref_out + query
        if torch.allclose(out, added, atol=1e-4) or torch.allclose(out, F.layer_norm(added, (16,)), atol=1e-4):
            raise CheckFailed("出力に入力 query が足されています。MultiHeadAttention の中では残差接続も層正規化もせず、"
                              "ブロックの側で 1 回だけ行います。")
        with torch.no_grad():
            if mask is None and any(torch.allclose(out, c, atol=1e-5, rtol=1e-4)
                                    for c in _heads_not_transposed(ours, query, key, value, mask)):
                raise CheckFailed("ヘッドの分け方が違います。view(B, T, H, d_head) の後に transpose(1, 2) で "
                                  "(B, H, T, d_head) にしてください"
                                  "（いきなり view(B, H, T, d_head) にすると位置とヘッドが混ざります）。")
    expect_close(out, ref_out, "output", hint=(
        "よくある原因: view の後の transpose(1, 2) 忘れ（ヘッドの分け方）、ヘッドを結合する前の transpose 忘れ、"
        "d_head ではなく d_model でのスケーリング、W_o の掛け忘れ。"))
    expect_close(w, ref_w, "weights", hint="weights には各ヘッドの softmax 後の確率を返してください。")


def _register_mha():
    ex = register("multi_head_attention", "マルチヘッドアテンション", chapter=CHAPTER, reference=MultiHeadAttention)

    @ex.test("MultiHeadAttention(16, 4) が W_q, W_k, W_v, W_o を持つ")
    def _(answer, ref):
        _mha_pair(answer, ref)

    @ex.test("自己アテンション、マスクなし")
    def _(answer, ref):
        _check_mha_case(answer, ref, B=2, T_q=5, T_k=5, self_attention=True)

    @ex.test("クロスアテンション (T_q=3, T_k=7)")
    def _(answer, ref):
        _check_mha_case(answer, ref, B=2, T_q=3, T_k=7)

    @ex.test("因果マスク (T, T)")
    def _(answer, ref):
        _check_mha_case(answer, ref, B=2, T_q=6, T_k=6, mask=causal_mask(6), self_attention=True)

    @ex.test("パディングマスク (B, 1, 1, T_k) と (B, 1, T_q, T_k)")
    def _(answer, ref):
        pad = torch.ones(2, 1, 1, 5, dtype=torch.bool)
        pad[1, ..., 2:] = False
        _check_mha_case(answer, ref, B=2, T_q=4, T_k=5, mask=pad)
        full = torch.rand(2, 1, 4, 5) > 0.3
        full[..., 0] = True  # every query may see at least one key
        _check_mha_case(answer, ref, B=2, T_q=4, T_k=5, mask=full)

    @ex.test("バッチ 1・長さ 1")
    def _(answer, ref):
        _check_mha_case(answer, ref, B=1, T_q=1, T_k=1, self_attention=True)

    @ex.test("dropout=1 の学習モードでは、アテンションの重みがすべて落ちて出力は W_o のバイアスだけになる")
    def _(answer, ref):
        theirs, ours = _mha_pair(answer, ref, dropout=1.0)
        x = torch.randn(2, 5, 16)
        out, _ = expect_tuple(_in_train_mode(theirs, x, x, x), "戻り値 (output, weights)", 2)
        expect_close(out, ours.W_o.bias.detach().expand(2, 5, 16), "dropout=1 の学習モードの output",
                     hint="dropout は softmax 後のアテンションの重み（出力の計算に使うほう）に "
                          "self.dropout でかけます。dropout を使っていないか、"
                          "アテンションの重み以外（出力など）にかけていませんか。")

    @ex.gpu_test
    def _(answer, ref, device):
        _check_mha_case(answer, ref, B=2, T_q=6, T_k=6, mask=causal_mask(6, device=device), self_attention=True,
                        device=device)

    @ex.test("dropout 引数: 評価モードでは出力を変えず、学習モードでも weights は確率のまま")
    def _(answer, ref):
        theirs, ours = _mha_pair(answer, ref, dropout=0.5)
        x = torch.randn(2, 5, 16)
        with torch.no_grad():
            out, _ = theirs(x, x, x)
            ref_out, _ = ours(x, x, x)
            expect_close(out, ref_out, "評価モードの output", hint="dropout は self.training のときだけ効かせます。")
            theirs.train()
            _, w = theirs(x, x, x)
        expect_tensor(w, "学習モードの weights", shape=(2, 4, 5, 5))
        expect_close(w.sum(-1), torch.ones(2, 4, 5), "学習モードの weights の行和",
                     hint="dropout は出力の計算に使うアテンションの重みにだけかけ、"
                                  "返す weights は softmax の確率のままにします。")


def _register_block():
    ex = register("transformer_block", "Pre-LN の Transformer ブロック", chapter=CHAPTER, reference=TransformerBlock)

    def pair(answer, ref, dropout=0.0):
        theirs = answer(16, 4, 32, dropout=dropout)
        ours = ref(16, 4, 32, dropout=dropout)
        copy_reference_parameters(theirs, ours, "ln1, attn, ln2, ff")
        return theirs.eval(), ours.eval()

    def compare(answer, ref, B, T, mask, device="cpu"):
        theirs, ours = pair(answer, ref)
        theirs, ours = theirs.to(device), ours.to(device)
        x = torch.randn(B, T, 16, device=device)
        with torch.no_grad():
            out = call_without_mutation(theirs, x, mask)
            expected = ours(x, mask)
            expect_tensor(out, "出力", shape=expected.shape)
            if torch.allclose(out, expected, atol=1e-5, rtol=1e-4):
                return
            a = lambda h: ours.attn(h, h, h, mask)[0]  # noqa: E731
            post = ours.ln1(x + a(x))
            post = ours.ln2(post + ours.ff(post))
            h = ours.ln1(x)
            normalized_stream = h + a(h)
            normalized_stream = ours.ln2(normalized_stream) + ours.ff(ours.ln2(normalized_stream))
            if torch.allclose(out, post, atol=1e-5, rtol=1e-4):
                raise CheckFailed("Post-LN（x = LN(x + Attn(x))）になっています。"
                                  "この演習は Pre-LN（x = x + Attn(LN(x))）です。")
            if torch.allclose(out, normalized_stream, atol=1e-5, rtol=1e-4):
                raise CheckFailed("残差に足す側まで正規化しています。h = LN(x) はサブ層への入力にだけ使い、"
                                  "足す先は正規化前の x です。")
            if mask is not None and torch.allclose(out, ours(x, None), atol=1e-5, rtol=1e-4):
                raise CheckFailed("マスクがアテンションに渡されていません。"
                                  "self.attn(h, h, h, mask) のように渡してください。")
        expect_close(out, expected, "出力",
                     hint="まず x に self.attn(ln1(x), …) の出力を足し、続いて self.ff(ln2(x)) を足します。"
                     "マスクを self.attn に渡しているかも確認してください。")

    @ex.test("マスクなし")
    def _(answer, ref):
        compare(answer, ref, B=2, T=5, mask=None)

    @ex.test("因果マスクをアテンションに渡す")
    def _(answer, ref):
        compare(answer, ref, B=2, T=6, mask=causal_mask(6))

    @ex.test("バッチ 1・長さ 1")
    def _(answer, ref):
        compare(answer, ref, B=1, T=1, mask=None)

    @ex.test("dropout=1 の学習モードでは、2 つのサブ層の出力がすべて落ちて入力がそのまま出る")
    def _(answer, ref):
        theirs, _ = pair(answer, ref, dropout=1.0)
        x = torch.randn(2, 5, 16)
        expect_close(_in_train_mode(theirs, x), x, "dropout=1 の学習モードの出力",
                     hint="dropout はサブ層の出力（残差に足す直前）にだけかけます: x = x + self.dropout(a)。"
                          "残差ストリーム x 自体にはかけません。")

    @ex.gpu_test
    def _(answer, ref, device):
        compare(answer, ref, B=2, T=6, mask=causal_mask(6, device=device), device=device)


_register_attention()
_register_causal_mask()
_register_positional_encoding()
_register_mha()
_register_block()
