"""The chapter 1 reference answers against PyTorch's own implementations."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_reference import perturbed, to_torch_layer, to_torch_mha

from solutions import transformer as tr


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


@pytest.mark.parametrize("T", [1, 2, 7])
def test_causal_mask_matches_torch_generate_square_subsequent_mask(T):
    """PyTorch's float mask has -inf where attending is forbidden and 0 where it is allowed."""
    theirs = nn.Transformer.generate_square_subsequent_mask(T)
    assert torch.equal(tr.causal_mask(T), theirs == 0)
    assert torch.isneginf(theirs[~tr.causal_mask(T)]).all()


def test_is_causal_aligns_the_mask_top_left():
    """With fewer queries than keys (a KV cache), is_causal=True is not the causal mask we need."""
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    bottom_right = torch.ones(2, 5, dtype=torch.bool).tril(5 - 2)  # queries are positions 3 and 4
    ours, _ = tr.scaled_dot_product_attention(q, k, v, bottom_right)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right))
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(top_left, tr.scaled_dot_product_attention(q, k, v, tr.causal_mask(5)[:2])[0])
    assert not torch.allclose(top_left, ours)


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


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_kv_cache_generation_equals_recomputing_the_prefix(positions):
    torch.manual_seed(0)
    lm = tr.CausalTransformerLM(13, 32, 4, 2, 64, 40, positions=positions)
    prompt = torch.randint(13, (3, 5))
    assert tr.supports_kv_cache(lm)
    greedy = tr.generate(lm, prompt, 30, use_cache=True)
    torch.testing.assert_close(greedy, tr.generate(lm, prompt, 30, use_cache=False), rtol=0, atol=0)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    sampled = tr.generate(lm, prompt, 30, temperature=1.0, generator=g1)
    assert torch.equal(sampled, tr.generate(lm, prompt, 30, temperature=1.0, generator=g2, use_cache=False))
    assert lm.training  # generate restores the mode it found


def test_kv_cache_step_matches_the_full_forward():
    """Logits of the last position from the cached path equal the full forward's, position by position."""
    torch.manual_seed(0)
    lm = tr.CausalTransformerLM(13, 32, 4, 3, 64, 40).eval()
    idx = torch.randint(13, (2, 12))
    caches = [{} for _ in lm.blocks]
    with torch.no_grad():
        full = lm(idx)
        for t in range(idx.size(1)):
            x = lm.tok_emb(idx[:, t:t + 1]) + lm.position(t, 1)
            for block, cache in zip(lm.blocks, caches, strict=True):
                x = tr.block_forward_cached(block, x, cache)
            torch.testing.assert_close(lm.head(lm.ln_f(x[:, -1])), full[:, t], atol=1e-5, rtol=1e-4)


def test_post_ln_models_generate_without_the_cache():
    lm = tr.CausalTransformerLM(13, 16, 2, 2, 32, 30, block_cls=tr.PostLNBlock)
    assert not tr.supports_kv_cache(lm)
    prompt = torch.randint(13, (2, 4))
    assert tr.generate(lm, prompt, 6).shape == (2, 10)


def test_ablating_a_head_zeroes_its_slice_before_w_o():
    torch.manual_seed(0)
    lm = tr.CausalTransformerLM(13, 32, 4, 2, 64, 20).eval()
    idx = torch.randint(13, (2, 9))
    attn = lm.blocks[1].attn
    seen = {}
    handle = attn.W_o.register_forward_hook(lambda m, args, out: seen.setdefault("in", args[0].clone()))
    with torch.no_grad(), tr.ablate_heads(lm, {1: [2]}):
        ablated = lm(idx)
    handle.remove()
    assert (seen["in"][..., 16:24] == 0).all() and (seen["in"][..., :16] != 0).any()
    with torch.no_grad():
        assert not torch.allclose(ablated, lm(idx))  # the head mattered
        with tr.ablate_heads(lm, {}):
            torch.testing.assert_close(lm(idx), lm(idx))
    assert not attn.W_o._forward_pre_hooks  # removed on exit


def test_learned_positions_are_parameters_and_unknown_kinds_fail():
    lm = tr.CausalTransformerLM(13, 16, 2, 1, 32, 10, positions="learned")
    assert lm.pos_emb.weight.shape == (10, 16) and lm.pos_emb.weight.requires_grad
    with pytest.raises(ValueError, match="positions"):
        tr.CausalTransformerLM(13, 16, 2, 1, 32, 10, positions="rotary")


def test_benchmark_times_the_attention_it_is_given():
    calls = []

    def counting(q, k, v, mask=None):
        calls.append(q.shape)
        return tr.scaled_dot_product_attention(q, k, v, mask)

    tr.benchmark_attention([32], heads=1, d_head=8, repeats=1, attention=counting)
    assert len(calls) >= 3  # the comparison, the warm-up and the timed call (and the memory run)


def test_post_ln_gradients_at_init_are_larger_and_the_gap_grows_with_depth():
    """What section 5 reports: Pre-LN's per-block gradient is flat in depth, Post-LN's is larger."""
    pre = [tr.init_gradient_norms(tr.TransformerBlock, L).mean(0) for L in (2, 16)]
    post = [tr.init_gradient_norms(tr.PostLNBlock, L).mean(0) for L in (2, 16)]
    assert (post[1] > pre[1]).all()
    ratio_shallow, ratio_deep = post[0][-1] / pre[0][-1], post[1][-1] / pre[1][-1]
    assert ratio_deep > 1.3 * ratio_shallow
    assert pre[1].max() / pre[1].min() < 1.6  # roughly the same at every layer position
    pre32, post32 = (tr.init_gradient_norms(cls, 32).mean(0) for cls in (tr.TransformerBlock, tr.PostLNBlock))
    assert pre32.max() / pre32.min() < 2 and (post32 > pre32).all()
    assert post32[-8:].mean() > post32[:8].mean()  # Post-LN: larger towards the output
    pre64, post64 = (tr.init_gradient_norms(cls, 64)[:, -1].mean() for cls in (tr.TransformerBlock, tr.PostLNBlock))
    assert pre64 < 0.85 * pre32[-1] < pre32[-1] < post64  # at 64 blocks Pre-LN starts to shrink


def test_the_residual_stream_at_init_grows_far_less_than_sqrt_depth():
    """What section 5 prints: with N(0, 1) embeddings the stream's std about doubles over 32 blocks."""
    std = tr.init_residual_std(tr.TransformerBlock, 32)
    assert std.shape == (3, 33)
    emb, last = std[:, 0].mean(), std[:, -1].mean()
    assert 1.0 < emb < 1.4 and emb < last < 2.5 * emb  # far from growing like sqrt(32) = 5.7
