"""Chapter 1's answer cases for the checker (used by tests/test_exercises.py).

``CORRECT``: answers written differently from the reference that must pass.
``WRONG``: the mistakes readers actually make, each with a phrase the verdict must contain
(or "" when any failure will do). Many are recognised only by their outputs, as the checker
must reject a mistake it has never seen by its effect.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from solutions import transformer as tr

# --------------------------------------------------------------------------- attention


def sdpa_einsum(q, k, v, mask=None):
    scores = torch.einsum("...qd,...kd->...qk", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = torch.where(mask, scores, torch.tensor(float("-inf"), dtype=scores.dtype))
    w = F.softmax(scores, dim=-1)
    return torch.einsum("...qk,...kd->...qd", w, v), w


def sdpa_minus_1e9(q, k, v, mask=None):  # -1e9 fill, mask == 0 convention: right in float32/64, fails in float16
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(k.size(-1))
    if mask is not None:
        scores = scores.masked_fill(mask == 0, -1e9)
    w = F.softmax(scores, dim=-1)
    return torch.matmul(w, v), w


def sdpa_no_scaling(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1)
    if mask is not None:
        s = s.masked_fill(~mask, -1e9)
    w = s.softmax(-1)
    return w @ v, w


def sdpa_wrong_axis(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if mask is not None:
        s = s.masked_fill(~mask, -1e9)
    w = s.softmax(-2)
    return w @ v, w


def sdpa_mask_after_softmax(q, k, v, mask=None):
    w = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))).softmax(-1)
    if mask is not None:
        w = w * mask
    return w @ v, w


def sdpa_inverted_mask(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if mask is not None:
        s = s.masked_fill(mask, -1e9)
    w = s.softmax(-1)
    return w @ v, w


def sdpa_scale_by_d(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / q.size(-1)
    if mask is not None:
        s = s.masked_fill(~mask, -1e9)
    w = s.softmax(-1)
    return w @ v, w


def sdpa_in_place(q, k, v, mask=None):  # right values, but it scales the caller's q in place
    q.div_(math.sqrt(q.size(-1)))
    scores = q @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, -1e9)
    w = scores.softmax(-1)
    return w @ v, w


def sdpa_returns_scores(q, k, v, mask=None):
    out, _ = tr.scaled_dot_product_attention(q, k, v, mask)
    return out, q @ k.transpose(-2, -1)


def sdpa_only_output(q, k, v, mask=None):
    return tr.scaled_dot_product_attention(q, k, v, mask)[0]


def sdpa_nan(q, k, v, mask=None):
    out, w = tr.scaled_dot_product_attention(q, k, v, mask)
    return out * float("nan"), w


def sdpa_float32_always(q, k, v, mask=None):
    out, w = tr.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask)
    return out, w


def sdpa_scale_by_v(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(v.size(-1))
    if mask is not None:
        s = s.masked_fill(~mask, -1e9)
    w = s.softmax(-1)
    return w @ v, w


def sdpa_4d_only(q, k, v, mask=None):
    _B, _H, _T, _d = q.shape  # breaks on 3-D input
    return tr.scaled_dot_product_attention(q, k, v, mask)


# ------------------------------------------------------------------------- causal mask


def mask_bool_from_float(T, device=None):
    return torch.tril(torch.ones(T, T, device=device)) > 0


def mask_float(T, device=None):
    return torch.tril(torch.ones(T, T, device=device))


def mask_upper(T, device=None):
    return torch.ones(T, T, dtype=torch.bool, device=device).triu()


def mask_strict(T, device=None):
    return torch.ones(T, T, dtype=torch.bool, device=device).tril(-1)


def mask_inverted(T, device=None):
    return ~torch.ones(T, T, dtype=torch.bool, device=device).tril()


def mask_no_device(T):
    return torch.ones(T, T, dtype=torch.bool).tril()


def mask_ignores_device(T, device=None):
    return torch.ones(T, T, dtype=torch.bool).tril()


# ------------------------------------------------------------------ positional encoding


def pe_loop(max_len, d_model):
    pe = torch.empty(max_len, d_model)
    for pos in range(max_len):
        for i in range(0, d_model, 2):
            pe[pos, i] = math.sin(pos / (10000 ** (i / d_model)))
            pe[pos, i + 1] = math.cos(pos / (10000 ** (i / d_model)))
    return pe


def pe_seed_style(max_len, d_model):
    pe = torch.zeros(max_len, d_model)
    position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


def pe_swapped(max_len, d_model):
    pe = tr.sinusoidal_positional_encoding(max_len, d_model)
    return torch.stack([pe[:, 1::2], pe[:, 0::2]], -1).flatten(1)


def pe_concatenated(max_len, d_model):
    pe = tr.sinusoidal_positional_encoding(max_len, d_model)
    return torch.cat([pe[:, 0::2], pe[:, 1::2]], 1)


def pe_i_not_2i(max_len, d_model):
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    i = torch.arange(d_model // 2, dtype=torch.float32)
    angle = pos / 10000 ** (i / d_model)
    return torch.stack([angle.sin(), angle.cos()], -1).flatten(1)


def pe_float64(max_len, d_model):
    return tr.sinusoidal_positional_encoding(max_len, d_model).double()


# --------------------------------------------------------------------------------- MHA


class MHABase(nn.Module):
    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__()
        self.h, self.dk = n_heads, d_model // n_heads
        self.W_q, self.W_k, self.W_v, self.W_o = (nn.Linear(d_model, d_model) for _ in range(4))
        self.drop = nn.Dropout(dropout)


class MHAEinsum(MHABase):
    """Correct, written differently: einsum, reshape/permute, -inf fill."""

    def forward(self, query, key, value, mask=None):
        B, Tq, D = query.shape
        q = self.W_q(query).reshape(B, Tq, self.h, self.dk).permute(0, 2, 1, 3)
        k = self.W_k(key).reshape(B, key.size(1), self.h, self.dk).permute(0, 2, 1, 3)
        v = self.W_v(value).reshape(B, value.size(1), self.h, self.dk).permute(0, 2, 1, 3)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(self.dk)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        w = s.softmax(-1)
        o = torch.einsum("bhqk,bhkd->bqhd", self.drop(w), v).reshape(B, Tq, D)
        return self.W_o(o), w


class MHASeed(MHABase):
    """The seed listing's version: residual + LayerNorm inside the attention."""

    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__(d_model, n_heads, dropout)
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, query, key, value, mask=None):
        out, w = MHAEinsum.forward(self, query, key, value, mask)
        return self.layer_norm(out + query), w


class MHANoTranspose(MHABase):
    def forward(self, query, key, value, mask=None):
        B, Tq, D = query.shape
        q = self.W_q(query).view(B, self.h, Tq, self.dk)  # heads and positions mixed up
        k = self.W_k(key).view(B, self.h, key.size(1), self.dk)
        v = self.W_v(value).view(B, self.h, value.size(1), self.dk)
        o, w = tr.scaled_dot_product_attention(q, k, v, mask)
        return self.W_o(o.transpose(1, 2).reshape(B, Tq, D)), w


class MHAAveragedWeights(MHAEinsum):
    def forward(self, query, key, value, mask=None):
        out, w = super().forward(query, key, value, mask)
        return out, w.mean(1)


class MHAScaleByDModel(MHABase):
    def forward(self, query, key, value, mask=None):
        B, Tq, D = query.shape
        split = lambda x: x.view(B, -1, self.h, self.dk).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.W_q(query)), split(self.W_k(key)), split(self.W_v(value))
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        if mask is not None:
            s = s.masked_fill(~mask, -1e9)
        w = s.softmax(-1)
        return self.W_o((w @ v).transpose(1, 2).reshape(B, Tq, D)), w


class MHANoOutputProjection(MHABase):
    def forward(self, query, key, value, mask=None):
        B, Tq, D = query.shape
        split = lambda x: x.view(B, -1, self.h, self.dk).transpose(1, 2)  # noqa: E731
        o, w = tr.scaled_dot_product_attention(split(self.W_q(query)), split(self.W_k(key)),
                                               split(self.W_v(value)), mask)
        return o.transpose(1, 2).reshape(B, Tq, D), w  # W_o forgotten


class MHAIgnoresMask(MHAEinsum):
    def forward(self, query, key, value, mask=None):
        return super().forward(query, key, value, None)


class MHADroppedWeights(MHAEinsum):
    def forward(self, query, key, value, mask=None):
        out, w = super().forward(query, key, value, mask)
        return out, self.drop(w)


class MHANoBias(MHABase):
    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__(d_model, n_heads, dropout)
        self.W_q, self.W_k, self.W_v, self.W_o = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))

    forward = MHAEinsum.forward


class MHAIgnoresDropout(MHAEinsum):
    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__(d_model, n_heads, 0.0)  # the argument is accepted and thrown away


class MHADropoutOnOutput(MHAEinsum):
    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__(d_model, n_heads, 0.0)
        self.out_drop = nn.Dropout(dropout)

    def forward(self, query, key, value, mask=None):
        out, w = super().forward(query, key, value, mask)
        return self.out_drop(out), w


class MHAWithFusedSdpa(MHABase):
    """Correct: F.scaled_dot_product_attention for the output, weights computed for the return value."""

    def forward(self, query, key, value, mask=None):
        B, Tq, D = query.shape
        split = lambda x: x.view(B, -1, self.h, self.dk).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.W_q(query)), split(self.W_k(key)), split(self.W_v(value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.drop.p if self.training else 0.0)
        w = tr.scaled_dot_product_attention(q, k, v, mask)[1]
        return self.W_o(out.transpose(1, 2).reshape(B, Tq, D)), w


class MHASelfOnly(MHABase):
    def forward(self, query, key, value, mask=None):
        return MHAEinsum.forward(self, query, query, query, mask)


# ------------------------------------------------------------------------------- block


class BlockBase(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, dropout=0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = tr.MultiHeadAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = tr.FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)


class BlockCorrectTwoLines(BlockBase):
    def forward(self, x, mask=None):
        x = x + self.dropout(self.attn(self.ln1(x), self.ln1(x), self.ln1(x), mask)[0])
        return x + self.dropout(self.ff(self.ln2(x)))  # a second dropout on the FFN branch is harmless


class BlockNoDropout(BlockBase):
    def forward(self, x, mask=None):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, mask)[0]
        return x + self.ff(self.ln2(x))


class BlockDropsTheStream(BlockBase):
    def forward(self, x, mask=None):
        h = self.ln1(x)
        x = self.dropout(x + self.attn(h, h, h, mask)[0])
        return x + self.ff(self.ln2(x))


class BlockPostLN(BlockBase):
    def forward(self, x, mask=None):
        x = self.ln1(x + self.attn(x, x, x, mask)[0])
        return self.ln2(x + self.ff(x))


class BlockNormalizedStream(BlockBase):
    def forward(self, x, mask=None):
        h = self.ln1(x)
        x = h + self.attn(h, h, h, mask)[0]
        h = self.ln2(x)
        return h + self.ff(h)


class BlockNoResidual(BlockBase):
    def forward(self, x, mask=None):
        h = self.ln1(x)
        x = self.attn(h, h, h, mask)[0]
        return x + self.ff(self.ln2(x))


class BlockIgnoresMask(BlockBase):
    def forward(self, x, mask=None):
        h = self.ln1(x)
        x = x + self.attn(h, h, h)[0]
        return x + self.ff(self.ln2(x))


class BlockSeedStyle(BlockBase):
    def forward(self, x, mask=None):  # FFN applied to the attention output only
        h = self.ln1(x)
        a = self.attn(h, h, h, mask)[0]
        return self.ln2(self.ff(a) + a)


class BlockRenamed(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = tr.MultiHeadAttention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = tr.FeedForward(d_model, d_ff, dropout)

    def forward(self, x, mask=None):
        return x


CORRECT = {
    "scaled_dot_product_attention": [sdpa_einsum],
    "causal_mask": [mask_bool_from_float],
    "sinusoidal_positional_encoding": [pe_loop, pe_seed_style],
    "multi_head_attention": [MHAEinsum, MHAWithFusedSdpa],
    "transformer_block": [BlockCorrectTwoLines],
}

# (wrong answer, a phrase the verdict must contain, or "" when any failure will do)
WRONG = {
    "scaled_dot_product_attention": [
        (sdpa_no_scaling, "スケーリングがありません"),
        (sdpa_wrong_axis, "softmax の軸"),
        (sdpa_mask_after_softmax, "softmax の後"),
        (sdpa_inverted_mask, "マスクの向きが逆"),
        (sdpa_scale_by_d, "d で割っています"),
        (sdpa_in_place, "書き換えられています"),
        (sdpa_returns_scores, "weights"),
        (sdpa_only_output, "タプル"),
        (sdpa_nan, "NaN"),
        (sdpa_float32_always, "dtype"),
        (sdpa_4d_only, "ValueError"),
        (sdpa_scale_by_v, "d_v=3"),
        (sdpa_minus_1e9, "float16 では表せません"),
    ],
    "causal_mask": [
        (mask_float, "dtype"),
        (mask_upper, "上三角"),
        (mask_strict, "対角"),
        (mask_inverted, "逆"),
        (mask_no_device, "TypeError"),
        (mask_ignores_device, "meta"),
    ],
    "sinusoidal_positional_encoding": [
        (pe_swapped, "sin と cos が逆"),
        (pe_concatenated, "交互"),
        (pe_i_not_2i, "2i"),
        (pe_float64, "dtype"),
    ],
    "multi_head_attention": [
        (MHASeed, "残差接続"),
        (MHANoTranspose, "ヘッドの分け方が違います"),
        (MHAIgnoresDropout, "dropout を使っていない"),
        (MHADropoutOnOutput, "dropout=1"),
        (MHAAveragedWeights, "平均せず"),
        (MHAScaleByDModel, "一致しません"),
        (MHANoOutputProjection, "一致しません"),
        (MHAIgnoresMask, "一致しません"),
        (MHADroppedWeights, "確率のまま"),
        (MHANoBias, "バイアス"),
        (MHASelfOnly, ""),
    ],
    "transformer_block": [
        (BlockPostLN, "Post-LN"),
        (BlockNormalizedStream, "正規化前の x"),
        (BlockNoResidual, "一致しません"),
        (BlockIgnoresMask, "マスクがアテンションに渡されていません"),
        (BlockNoDropout, "残差に足す直前"),
        (BlockDropsTheStream, "dropout=1"),
        (BlockSeedStyle, "一致しません"),
        (BlockRenamed, "ln1, attn, ln2, ff）を変えないで"),
    ],
}
