"""The chapter 1 reference answers against PyTorch's own implementations."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from solutions import transformer as tr


def to_torch_mha(ours):
    d = ours.W_q.in_features
    theirs = nn.MultiheadAttention(d, ours.n_heads, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.W_q.weight, ours.W_k.weight, ours.W_v.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.W_q.bias, ours.W_k.bias, ours.W_v.bias]))
        theirs.out_proj.load_state_dict(ours.W_o.state_dict())
    return theirs.eval()


def to_torch_layer(ours, norm_first):
    d, d_ff = ours.ff.fc1.in_features, ours.ff.fc1.out_features
    theirs = nn.TransformerEncoderLayer(d, ours.attn.n_heads, d_ff, dropout=0.0, activation="gelu",
                                        batch_first=True, norm_first=norm_first)
    with torch.no_grad():
        theirs.self_attn.load_state_dict(to_torch_mha(ours.attn).state_dict())
        theirs.norm1.load_state_dict(ours.ln1.state_dict())
        theirs.norm2.load_state_dict(ours.ln2.state_dict())
        theirs.linear1.load_state_dict(ours.ff.fc1.state_dict())
        theirs.linear2.load_state_dict(ours.ff.fc2.state_dict())
    return theirs.eval()


def perturbed(module):
    """Move every parameter off its initial value (LayerNorm starts as the identity map)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_kind", [None, "causal", "padding", "random"])
def test_attention_matches_torch_sdpa(dtype, mask_kind):
    torch.manual_seed(0)
    q = torch.randn(2, 3, 7, 8, dtype=dtype)
    k, v = torch.randn(2, 3, 9, 8, dtype=dtype), torch.randn(2, 3, 9, 8, dtype=dtype)
    if mask_kind == "causal":
        k, v = k[..., :7, :], v[..., :7, :]
        mask = tr.causal_mask(7)
    elif mask_kind == "padding":
        mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
        mask[1, ..., 4:] = False
    elif mask_kind == "random":
        mask = torch.rand(2, 3, 7, 9) > 0.5
        mask[..., 0] = True
    else:
        mask = None
    out, w = tr.scaled_dot_product_attention(q, k, v, mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    if mask is not None:
        assert (w.masked_select(~mask.expand_as(w)) == 0).all()


def test_attention_is_causal_flag():
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    out, _ = tr.scaled_dot_product_attention(q, k, v, tr.causal_mask(6))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_causal_mask_is_lower_triangular():
    m = tr.causal_mask(5)
    assert m.dtype == torch.bool
    assert all(m[i, j] == (j <= i) for i in range(5) for j in range(5))


@pytest.mark.parametrize("d", [12, 7])  # an odd width too: the seed listing's version crashes there
def test_positional_encoding_matches_the_paper_formula(d):
    max_len = 40
    expected = np.zeros((max_len, d))
    for pos in range(max_len):
        for j in range(d):
            angle = pos / 10000 ** (2 * (j // 2) / d)
            expected[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    pe = tr.sinusoidal_positional_encoding(max_len, d)
    assert pe.dtype == torch.float32
    np.testing.assert_allclose(pe.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("case", ["self", "causal", "cross_padding", "batch1"])
def test_multi_head_attention_matches_nn_multiheadattention(case):
    torch.manual_seed(0)
    ours = tr.MultiHeadAttention(32, 4).eval()
    theirs = to_torch_mha(ours)
    x, mem = torch.randn(2, 6, 32), torch.randn(2, 9, 32)
    with torch.no_grad():
        if case == "self":
            a, b = ours(x, x, x), theirs(x, x, x, average_attn_weights=False)
        elif case == "causal":
            m = tr.causal_mask(6)
            a, b = ours(x, x, x, m), theirs(x, x, x, attn_mask=~m, average_attn_weights=False)
        elif case == "cross_padding":
            pad = torch.zeros(2, 9, dtype=torch.bool)
            pad[0, 6:] = True
            a = ours(x, mem, mem, ~pad[:, None, None, :])
            b = theirs(x, mem, mem, key_padding_mask=pad, average_attn_weights=False)
        else:
            x1 = torch.randn(1, 1, 32)
            a, b = ours(x1, x1, x1), theirs(x1, x1, x1, average_attn_weights=False)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-4)


def test_multi_head_attention_has_no_residual_or_norm():
    names = {n for n, _ in tr.MultiHeadAttention(16, 4).named_parameters()}
    assert names == {f"{w}.{p}" for w in ("W_q", "W_k", "W_v", "W_o") for p in ("weight", "bias")}


def test_dropout_keeps_returned_weights_probabilities():
    mha = tr.MultiHeadAttention(16, 4, dropout=0.5).train()
    x = torch.randn(2, 5, 16)
    out1, w = mha(x, x, x)
    out2, _ = mha(x, x, x)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5))
    assert not torch.allclose(out1, out2)  # dropout is active on the output path


@pytest.mark.parametrize("masked", [False, True])
def test_pre_ln_block_matches_transformer_encoder_layer(masked):
    torch.manual_seed(0)
    block = perturbed(tr.TransformerBlock(32, 4, 64))
    layer = to_torch_layer(block, norm_first=True)
    x = torch.randn(2, 7, 32)
    m = tr.causal_mask(7) if masked else None
    with torch.no_grad():
        expected = layer(x, src_mask=~m) if masked else layer(x)
        torch.testing.assert_close(block(x, m), expected, atol=1e-5, rtol=1e-4)


def test_post_ln_block_matches_transformer_encoder_layer():
    torch.manual_seed(0)
    block = perturbed(tr.PostLNBlock(32, 4, 64))
    layer = to_torch_layer(block, norm_first=False)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(x), layer(x), atol=1e-5, rtol=1e-4)


def test_lm_future_tokens_never_change_earlier_outputs():
    torch.manual_seed(0)
    lm = tr.CausalTransformerLM(13, 32, 4, 2, 64, 32).eval()
    idx = torch.randint(13, (3, 24))
    for t in (1, 10, 23):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 1) % 13
        with torch.no_grad():
            a, b = lm(idx), lm(changed)
        assert torch.equal(a[:, :t], b[:, :t])
        assert not torch.allclose(a[:, t:], b[:, t:])  # the changed positions do change


def test_lm_without_mask_would_leak():
    """The property above is not vacuous: an all-True mask lets the future in."""
    torch.manual_seed(0)
    lm = tr.CausalTransformerLM(13, 32, 4, 2, 64, 32).eval()
    lm.mask.fill_(True)
    idx = torch.randint(13, (2, 16))
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 13
    with torch.no_grad():
        assert not torch.allclose(lm(idx)[:, :8], lm(changed)[:, :8])


def test_benchmark_agrees_and_measures_memory():
    rows = tr.benchmark_attention([64, 256], heads=2, d_head=16, repeats=1)
    for r in rows:
        assert r["max_diff"] < 1e-5
        assert r["naive_ms"] > 0 and r["sdpa_ms"] > 0
    # The naive version materializes (T, T) score matrices: 16x more at 4x the length.
    assert rows[1]["naive_mib"] > 8 * rows[0]["naive_mib"] > 0
    assert rows[1]["sdpa_mib"] < rows[1]["naive_mib"] / 4
