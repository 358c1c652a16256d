"""The chapter 2 reference answers against independent authorities: PyTorch's own layers
(F.unfold, nn.TransformerEncoderLayer, F.cross_entropy with probability targets), SciPy's Beta
distribution, and properties derived by hand (every pixel from one of two images, one box, the
exact share of pixels)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch_reference import perturbed, to_torch_layer

from solutions import vit

# --------------------------------------------------------------------------- patch embedding


@pytest.mark.parametrize("img, p, c, d", [(8, 2, 1, 16), (12, 4, 3, 8), (4, 4, 2, 5), (6, 1, 1, 3)])
def test_patch_embedding_is_unfold_plus_one_linear_map(img, p, c, d):
    torch.manual_seed(0)
    ours = perturbed(vit.PatchEmbedding(img, p, c, d))
    x = torch.randn(3, c, img, img)
    with torch.no_grad():
        by_unfold = F.linear(F.unfold(x, p, stride=p).transpose(1, 2), ours.proj.weight.flatten(1), ours.proj.bias)
        out = ours(x)
    assert out.shape == (3, (img // p) ** 2, d) and ours.n_patches == (img // p) ** 2
    torch.testing.assert_close(out, by_unfold)


def test_patch_order_is_row_major_by_hand():
    """Patch k is the block at grid row k // g, column k % g, computed with explicit loops."""
    torch.manual_seed(0)
    ours = vit.PatchEmbedding(6, 2, 2, 4)
    x = torch.randn(1, 2, 6, 6)
    w, b = ours.proj.weight.detach(), ours.proj.bias.detach()
    with torch.no_grad():
        out = ours(x)
    for k in range(9):
        r, c = divmod(k, 3)
        patch = x[0, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2]
        expected = torch.stack([(w[j] * patch).sum() + b[j] for j in range(4)])
        torch.testing.assert_close(out[0, k], expected)


# --------------------------------------------------------------------------- vision transformer


def torch_vit_forward(model, x):
    """The ViT forward written with PyTorch's layers: conv patches, nn.TransformerEncoderLayer
    (norm_first=True, GELU) holding the same parameters as each block, then LayerNorm and head."""
    pe = model.patch_embed.proj
    tokens = F.conv2d(x, pe.weight, pe.bias, stride=pe.stride).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], 1) + model.pos_embed
    for block in model.blocks:
        h = to_torch_layer(block, norm_first=True)(h)
    h = F.layer_norm(h[:, 0], h.shape[-1:], model.ln.weight, model.ln.bias, model.ln.eps)
    return F.linear(h, model.head.weight, model.head.bias)


@pytest.mark.parametrize("img, p, c, layers", [(8, 2, 1, 3), (12, 4, 3, 2)])
def test_vit_forward_matches_pytorch_layers(img, p, c, layers):
    torch.manual_seed(0)
    model = perturbed(vit.VisionTransformer(img, p, c, 10, 32, 4, layers, 64))
    x = torch.randn(5, c, img, img)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch_vit_forward(model, x), atol=1e-5, rtol=1e-4)


def test_vit_initialisation_and_permutation_invariance_without_positions():
    torch.manual_seed(0)
    model = vit.VisionTransformer(8, 2, 1, 10, 64, 4, 2, 128).eval()
    assert torch.count_nonzero(model.cls_token) == 0
    assert 0.015 < model.pos_embed.std().item() < 0.025
    x = torch.randn(2, 1, 8, 8)
    perm = torch.randperm(16)
    cols = F.unfold(x, 2, stride=2)
    shuffled = F.fold(cols[..., perm], (8, 8), 2, stride=2)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(shuffled), atol=1e-4)
        model.pos_embed.zero_()
        torch.testing.assert_close(model(x), model(shuffled), atol=1e-5, rtol=1e-4)


def test_attention_maps_are_the_blocks_attention_weights():
    torch.manual_seed(0)
    model = perturbed(vit.VisionTransformer(8, 2, 1, 10, 32, 4, 2, 64))
    x = torch.randn(3, 1, 8, 8)
    maps = vit.attention_maps(model, x)
    assert len(maps) == 2 and maps[0].shape == (3, 4, 17, 17)
    with torch.no_grad():
        h = torch.cat([model.cls_token.expand(3, -1, -1), model.patch_embed(x)], 1) + model.pos_embed
        q = model.blocks[0].ln1(h)
        attn = to_torch_layer(model.blocks[0], norm_first=True).self_attn
        _, w = attn(q, q, q, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(maps[0], w, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(3, 4, 17))


def test_attention_rollout_by_hand():
    a1 = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    a2 = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    step = lambda a: 0.5 * a.mean(1) + 0.5 * torch.eye(5)  # noqa: E731  (Abnar & Zuidema: 0.5 A + 0.5 I)
    torch.testing.assert_close(vit.attention_rollout([a1]), step(a1))
    rollout = vit.attention_rollout([a1, a2])
    torch.testing.assert_close(rollout, step(a2) @ step(a1))
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 5))


def test_position_similarity_and_its_correlation_with_the_grid():
    model = vit.VisionTransformer(8, 2, 1, 10, 16, 4, 1, 32)
    with torch.no_grad():  # embeddings that are smooth functions of the 2-D position
        rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
        freqs = torch.linspace(0.2, 0.8, 4)
        feats = [f(k * v) for k in freqs for v in (rows, cols) for f in (torch.sin, torch.cos)]
        model.pos_embed[0, 1:] = torch.stack(feats, -1).view(16, 16)
    sim = vit.position_similarity(model)
    assert sim.shape == (4, 4, 4, 4)
    torch.testing.assert_close(sim[1, 2, 1, 2], torch.tensor(1.0))
    torch.testing.assert_close(sim, sim.permute(2, 3, 0, 1))  # symmetric
    assert vit.position_distance_correlation(model) > 0.8
    torch.manual_seed(0)
    assert abs(vit.position_distance_correlation(vit.VisionTransformer(8, 2, 1, 10, 64, 4, 1, 32))) < 0.2


# --------------------------------------------------------------------------- mixup and cutmix


def test_beta_sample_follows_scipy_beta_and_the_generator():
    for alpha in (0.2, 1.0, 3.0):
        draws = [vit.beta_sample(alpha, torch.Generator().manual_seed(s)) for s in range(3000)]
        assert stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [vit.beta_sample(0.5, g1) for _ in range(3)] == [vit.beta_sample(0.5, g2) for _ in range(3)]


def test_mixup_is_a_convex_combination_with_one_lam_and_one_permutation():
    x, y = torch.randn(16, 3, 5, 7), torch.arange(16)
    before = x.clone()
    for seed in range(10):
        mixed, y_a, y_b, lam = vit.mixup(x, y, 0.4, torch.Generator().manual_seed(seed))
        assert torch.equal(y_a, y) and torch.equal(y_b.sort().values, y)
        torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[y_b])
    assert torch.equal(x, before)
    mixed, _, _, lam = vit.mixup(x, y, 0.0)
    assert lam == 1.0 and torch.equal(mixed, x)


def pasted_mask(x, mixed, y_b):
    """(H, W) bool: where mixed comes from x[perm]; asserts one source per pixel and one shared box."""
    from_x, from_other = mixed == x, mixed == x[y_b]
    assert (from_x | from_other).all()
    moved = y_b != torch.arange(len(x))
    pasted = (from_other & ~from_x)[moved]
    assert (pasted == pasted[0, 0]).all()
    return pasted[0, 0]


@pytest.mark.parametrize("shape", [(6, 1, 8, 8), (4, 3, 6, 16), (4, 2, 16, 6), (3, 1, 1, 9)])
def test_cutmix_pastes_one_rectangle_and_returns_the_exact_share(shape):
    torch.manual_seed(0)
    x, y = torch.randn(*shape), torch.arange(shape[0])
    before = x.clone()
    H, W = shape[-2:]
    for seed in range(200):
        mixed, y_a, y_b, lam = vit.cutmix(x, y, 1.0, torch.Generator().manual_seed(seed))
        assert torch.equal(y_a, y)
        if torch.equal(y_b, y):
            continue
        box = pasted_mask(x, mixed, y_b)
        rows, cols = box.any(1), box.any(0)
        assert torch.equal(box, rows[:, None] & cols[None, :])
        assert math.isclose(lam, 1 - box.sum().item() / (H * W), abs_tol=1e-12)
    assert torch.equal(x, before)


def test_cutmix_box_follows_the_image_axes_and_covers_every_border():
    H, W = 12, 40
    x, y = torch.randn(3, 1, H, W), torch.arange(3)
    heights, widths, hits = [], [], np.zeros((2, 2))
    for seed in range(600):
        mixed, _, y_b, _ = vit.cutmix(x, y, 1.0, torch.Generator().manual_seed(seed))
        if torch.equal(y_b, y):
            continue
        box = pasted_mask(x, mixed, y_b)
        rows, cols = box.any(1), box.any(0)
        hits += np.array([[rows[0], rows[-1]], [cols[0], cols[-1]]], dtype=float)
        if box.any() and not (rows[0] or rows[-1] or cols[0] or cols[-1]):
            heights.append(rows.sum().item() / H)
            widths.append(cols.sum().item() / W)
    assert 0.75 < np.mean(heights) / np.mean(widths) < 1.25
    assert hits.min() > 50 and abs(hits[0, 0] - hits[0, 1]) < 60 and abs(hits[1, 0] - hits[1, 1]) < 60


def test_mixed_cross_entropy_equals_cross_entropy_with_probability_targets():
    torch.manual_seed(0)
    logits, y_a, y_b = torch.randn(7, 10), torch.randint(10, (7,)), torch.randint(10, (7,))
    for lam in (0.0, 0.25, 1.0, torch.tensor(0.6)):
        target = lam * F.one_hot(y_a, 10).float() + (1 - lam) * F.one_hot(y_b, 10).float()
        torch.testing.assert_close(vit.mixed_cross_entropy(logits, y_a, y_b, lam), F.cross_entropy(logits, target))


# --------------------------------------------------------------------------- data and training


def test_digits_split_is_stratified_standardized_and_disjoint():
    data = vit.load_digits_images()
    assert data.train_x.shape == (1437, 1, 8, 8) and data.test_x.shape == (360, 1, 8, 8)
    assert abs(data.train_x.mean().item()) < 1e-4 and abs(data.train_x.std().item() - 1) < 1e-4
    counts = torch.bincount(data.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    train = {tuple(v.tolist()) for v in data.to_pixels(data.train_x).flatten(1)}
    # digits contains a few duplicate images; the split is by index, so only those may appear in both
    assert sum(tuple(v.tolist()) in train for v in data.to_pixels(data.test_x).flatten(1)) < 5
    big = vit.load_digits_images(size=16)
    assert big.train_x.shape == (1437, 1, 16, 16) and torch.equal(big.train_y, data.train_y)


def test_augment_batch_switches_and_rejects_unknown_names():
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    gen = torch.Generator().manual_seed(0)
    out = vit.augment_batch(x, y, "none", 1.0, gen)
    assert out[0] is x and out[3] == 1.0
    kinds = set()
    for _ in range(40):
        mixed, _, y_b, _ = vit.augment_batch(x, y, "both", 1.0, gen)
        moved = y_b != y
        if moved.any():
            same = (mixed == x) | (mixed == x[y_b])
            kinds.add("cutmix" if same.all() else "mixup")
    assert kinds == {"mixup", "cutmix"}
    with pytest.raises(ValueError, match="augmentation"):
        vit.augment_batch(x, y, "mixpu", 1.0, gen)


def test_train_vit_records_its_history_and_uses_the_given_functions():
    data = vit.load_digits_images()
    calls = []

    def counting_mixup(x, y, alpha, generator=None):
        calls.append(len(x))
        return vit.mixup(x, y, alpha, generator)

    torch.manual_seed(0)
    model = vit.VisionTransformer(8, 2, 1, 10, 16, 2, 1, 32)
    h = vit.train_vit(model, data, 2, batch_size=256, augmentation="mixup", mixup_fn=counting_mixup)
    steps = 2 * math.ceil(1437 / 256)
    assert len(h["train_loss"]) == len(h["lr"]) == steps and len(calls) == steps
    assert h["epoch"] == [1, 2] and len(h["test_acc"]) == 2
    assert h["lr"] == sorted(h["lr"]) and h["lr"][-1] < 1e-3  # still inside the 5-epoch warm-up
    assert 0 <= h["clean_train_acc"] <= 1 and h["seconds"] > 0
