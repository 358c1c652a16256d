"""Chapter 2's answer cases for the checker (used by tests/test_exercises.py).

``CORRECT``: answers written differently from the reference that must pass.
``WRONG``: the mistakes readers actually make (several taken from the seed listing), each with
a phrase the verdict must contain (or "" when any failure will do).
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from solutions import vit

# --------------------------------------------------------------------------- patch embedding


class PatchByUnfold(nn.Module):  # the same linear map, applied to explicitly cut patches
    def __init__(self, img_size, patch_size, in_channels, d_model):
        super().__init__()
        self.p = patch_size
        self.proj = nn.Conv2d(in_channels, d_model, patch_size, patch_size)

    def forward(self, x):
        patches = F.unfold(x, self.p, stride=self.p).transpose(1, 2)  # (B, n, C·p·p)
        return patches @ self.proj.weight.flatten(1).T + self.proj.bias


class PatchPermute(nn.Module):
    def __init__(self, img_size, patch_size, in_channels, d_model):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, d_model, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        y = self.proj(x).permute(0, 2, 3, 1)  # (B, g, g, d)
        return y.reshape(y.size(0), -1, y.size(-1))


class PatchColumnMajor(vit.PatchEmbedding):
    def forward(self, x):
        return self.proj(x).transpose(2, 3).flatten(2).transpose(1, 2)


class PatchNoTranspose(vit.PatchEmbedding):
    def forward(self, x):
        y = self.proj(x)
        return y.reshape(y.size(0), -1, y.size(1))


class PatchOverlapping(nn.Module):
    def __init__(self, img_size, patch_size, in_channels, d_model):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, d_model, kernel_size=patch_size, stride=1)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class PatchLinear(nn.Module):
    def __init__(self, img_size, patch_size, in_channels, d_model):
        super().__init__()
        self.p = patch_size
        self.proj = nn.Linear(in_channels * patch_size**2, d_model)

    def forward(self, x):
        return self.proj(F.unfold(x, self.p, stride=self.p).transpose(1, 2))


class PatchNoBias(nn.Module):
    def __init__(self, img_size, patch_size, in_channels, d_model):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, d_model, patch_size, patch_size, bias=False)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class PatchThreeChannels(nn.Module):  # the seed: in_channels fixed to 3
    def __init__(self, img_size, patch_size, in_channels, d_model):
        super().__init__()
        self.proj = nn.Conv2d(3, d_model, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class PatchWithGelu(vit.PatchEmbedding):
    def forward(self, x):
        return F.gelu(super().forward(x))


# --------------------------------------------------------------------------- vision transformer


class ViTSplitPositions(vit.VisionTransformer):  # positions added before the concatenation, LN on every token
    def forward(self, x):
        B = x.shape[0]
        patches = self.patch_embed(x) + self.pos_embed[:, 1:]
        cls = self.cls_token.repeat(B, 1, 1) + self.pos_embed[:, :1]
        h = self.dropout(torch.cat((cls, patches), dim=1))
        for block in self.blocks:
            h = block(h, None)
        return self.head(self.ln(h)[:, 0, :])


class ViTMeanPool(vit.VisionTransformer):
    def forward(self, x):
        h = torch.cat([self.cls_token.expand(x.size(0), -1, -1), self.patch_embed(x)], 1) + self.pos_embed
        h = self.dropout(h)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h).mean(1))


class ViTNoPositions(vit.VisionTransformer):
    def forward(self, x):
        h = self.dropout(torch.cat([self.cls_token.expand(x.size(0), -1, -1), self.patch_embed(x)], 1))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h)[:, 0])


class ViTNoFinalNorm(vit.VisionTransformer):
    def forward(self, x):
        h = torch.cat([self.cls_token.expand(x.size(0), -1, -1), self.patch_embed(x)], 1) + self.pos_embed
        h = self.dropout(h)
        for block in self.blocks:
            h = block(h)
        return self.head(h[:, 0])


class ViTLastToken(vit.VisionTransformer):
    def forward(self, x):
        h = torch.cat([self.cls_token.expand(x.size(0), -1, -1), self.patch_embed(x)], 1) + self.pos_embed
        h = self.dropout(h)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h)[:, -1])


class ViTNoDropout(vit.VisionTransformer):
    def forward(self, x):
        h = torch.cat([self.cls_token.expand(x.size(0), -1, -1), self.patch_embed(x)], 1) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h)[:, 0])


class ViTUnitNormalPositions(vit.VisionTransformer):  # the seed's initialisation
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        nn.init.normal_(self.pos_embed)
        nn.init.normal_(self.cls_token)


class ViTPostLN(vit.VisionTransformer):  # the seed's blocks normalise after the residual sum
    def forward(self, x):
        h = torch.cat([self.cls_token.expand(x.size(0), -1, -1), self.patch_embed(x)], 1) + self.pos_embed
        h = self.dropout(h)
        for b in self.blocks:
            h = b.ln1(h + b.attn(h, h, h)[0])
            h = b.ln2(h + b.ff(h))
        return self.head(self.ln(h)[:, 0])


class ViTClsAtEnd(vit.VisionTransformer):
    def forward(self, x):
        h = torch.cat([self.patch_embed(x), self.cls_token.expand(x.size(0), -1, -1)], 1) + self.pos_embed
        h = self.dropout(h)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h)[:, -1])


# --------------------------------------------------------------------------- mixup


def mixup_lerp(x, y, alpha, generator=None):  # permutation first, lam as a tensor, torch.lerp
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    if alpha <= 0:
        return x.clone(), y, y[perm], torch.tensor(1.0)
    g1 = torch._standard_gamma(torch.tensor([alpha, alpha], dtype=torch.float64), generator=generator)
    lam = (g1[0] / g1.sum()).to(torch.float32)
    return torch.lerp(x[perm], x, lam.to(x.device, x.dtype)), y, y[perm], lam


def mixup_seed_style(x, y, alpha, generator=None):  # the seed: global NumPy and torch generators
    lam = np.random.beta(alpha, alpha) if alpha > 0 else 1  # noqa: NPY002
    index = torch.randperm(x.size(0)).to(x.device)
    return lam * x + (1 - lam) * x[index], y, y[index], lam


def mixup_swapped(x, y, alpha, generator=None):
    mixed, y_a, y_b, lam = vit.mixup(x, y, alpha, generator)
    return mixed, y_a, y_b, 1 - lam if alpha > 0 else lam


def mixup_per_sample(x, y, alpha, generator=None):
    perm = torch.randperm(len(x), generator=generator)
    lams = torch.tensor([vit.beta_sample(alpha, generator) for _ in range(len(x))]).view(-1, 1, 1, 1).to(x.dtype)
    return lams * x + (1 - lams) * x[perm], y, y[perm], lams.mean().item()


def mixup_uniform(x, y, alpha, generator=None):
    lam = torch.rand((), generator=generator).item() if alpha > 0 else 1.0
    perm = torch.randperm(len(x), generator=generator)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def mixup_max(x, y, alpha, generator=None):  # lam folded to [0.5, 1]: not Beta(alpha, alpha)
    lam = vit.beta_sample(alpha, generator) if alpha > 0 else 1.0
    lam = max(lam, 1 - lam)
    perm = torch.randperm(len(x), generator=generator)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def mixup_two_permutations(x, y, alpha, generator=None):
    lam = vit.beta_sample(alpha, generator) if alpha > 0 else 1.0
    p1, p2 = torch.randperm(len(x), generator=generator), torch.randperm(len(x), generator=generator)
    return lam * x + (1 - lam) * x[p1], y, y[p2], lam


def mixup_in_place(x, y, alpha, generator=None):
    lam = vit.beta_sample(alpha, generator) if alpha > 0 else 1.0
    perm = torch.randperm(len(x), generator=generator)
    other = x[perm]
    return x.mul_(lam).add_((1 - lam) * other), y, y[perm], lam


def mixup_no_alpha_check(x, y, alpha, generator=None):
    seed = int(torch.randint(2**31, (), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(len(x), generator=generator)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def mixup_permutes_y_a(x, y, alpha, generator=None):
    mixed, y_a, y_b, lam = vit.mixup(x, y, alpha, generator)
    return mixed, y_b, y_a, lam


def mixup_fixed_generator(x, y, alpha, generator=None):  # ignores the argument, reseeds every call
    return vit.mixup(x, y, alpha, torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- cutmix


def cutmix_mask(x, y, alpha, generator=None):  # a float mask and torch.where; the box from its corners
    B, _, H, W = x.shape
    perm = torch.randperm(B, generator=generator).to(x.device)
    if alpha <= 0:
        return x.clone(), y, y[perm], torch.tensor(1.0)
    lam0 = vit.beta_sample(alpha, generator)
    h, w = round(H * math.sqrt(1 - lam0)), round(W * math.sqrt(1 - lam0))
    cy, cx = (torch.rand(2, generator=generator) * torch.tensor([H, W])).long().tolist()
    rows = torch.arange(H, device=x.device)
    cols = torch.arange(W, device=x.device)
    inside = ((rows >= cy - h / 2) & (rows < cy + h / 2))[:, None] & ((cols >= cx - w / 2) & (cols < cx + w / 2))
    mixed = torch.where(inside, x[perm], x)
    return mixed, y, y[perm], torch.tensor(1 - inside.float().mean().item())


def cutmix_seed_style(x, y, alpha, generator=None):  # the seed, verbatim in spirit: np.int, global RNG, in place
    lam = np.random.beta(alpha, alpha) if alpha > 0 else 1  # noqa: NPY002
    index = torch.randperm(x.size(0)).to(x.device)
    W, H = x.size(2), x.size(3)
    cut_rat = np.sqrt(1.0 - lam)
    cut_w, cut_h = np.int(W * cut_rat), np.int(H * cut_rat)  # noqa: NPY001  (removed in NumPy 1.24)
    cx, cy = np.random.randint(W), np.random.randint(H)  # noqa: NPY002
    bbx1, bby1 = np.clip(cx - cut_w // 2, 0, W), np.clip(cy - cut_h // 2, 0, H)
    bbx2, bby2 = np.clip(cx + cut_w // 2, 0, W), np.clip(cy + cut_h // 2, 0, H)
    x[:, :, bbx1:bbx2, bby1:bby2] = x[index, :, bbx1:bbx2, bby1:bby2]
    lam = 1 - ((bbx2 - bbx1) * (bby2 - bby1) / (W * H))
    return x, y, y[index], lam


def cutmix_in_place(x, y, alpha, generator=None):  # np.int fixed, but still writes into the caller's x
    mixed, y_a, y_b, lam = vit.cutmix(x, y, alpha, generator)
    x.copy_(mixed)
    return x, y_a, y_b, lam


def _box(x, alpha, generator, hw_for_centre, hw_for_size):
    lam0 = vit.beta_sample(alpha, generator)
    cut = math.sqrt(1 - lam0)
    (Hc, Wc), (Hs, Ws) = hw_for_centre, hw_for_size
    cut_h, cut_w = int(Hs * cut), int(Ws * cut)
    cy, cx = int(torch.randint(Hc, (), generator=generator)), int(torch.randint(Wc, (), generator=generator))
    return (max(cy - cut_h // 2, 0), min(cy + cut_h // 2, Hc), max(cx - cut_w // 2, 0), min(cx + cut_w // 2, Wc),
            lam0)


def _paste(x, y, alpha, generator, hw_for_centre, hw_for_size, hw_for_share):
    """A CutMix whose box draws its centre and size from the given (H, W) pairs; returns the
    batch, the labels, the share kept as computed with hw_for_share, and the drawn lam."""
    top, bottom, left, right, lam0 = _box(x, alpha, generator, hw_for_centre, hw_for_size)
    perm = torch.randperm(len(x), generator=generator)
    mixed = x.clone()
    mixed[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]  # slicing clips silently
    H, W = hw_for_share
    return mixed, y, y[perm], 1 - (bottom - top) * (right - left) / (H * W), lam0


def cutmix_names_swapped(x, y, alpha, generator=None):  # W, H = x.shape[-2:] but the slice written as [y, x]
    if alpha <= 0:
        return x.clone(), y, y, 1.0
    W, H = x.shape[-2:]
    return _paste(x, y, alpha, generator, (H, W), (H, W), (H, W))[:4]


def cutmix_aspect_swapped(x, y, alpha, generator=None):  # box height from W and width from H
    if alpha <= 0:
        return x.clone(), y, y, 1.0
    H, W = x.shape[-2:]
    return _paste(x, y, alpha, generator, (H, W), (W, H), (H, W))[:4]


def cutmix_unclipped_lam(x, y, alpha, generator=None):  # returns the drawn lam, not the pasted share
    if alpha <= 0:
        return x.clone(), y, y, 1.0
    H, W = x.shape[-2:]
    mixed, y_a, y_b, _, lam0 = _paste(x, y, alpha, generator, (H, W), (H, W), (H, W))
    return mixed, y_a, y_b, lam0


def cutmix_pasted_share(x, y, alpha, generator=None):
    mixed, y_a, y_b, lam = vit.cutmix(x, y, alpha, generator)
    return mixed, y_a, y_b, 1 - lam if alpha > 0 else lam


def cutmix_blend(x, y, alpha, generator=None):  # mixes inside the box instead of pasting
    mixed, y_a, y_b, lam = vit.cutmix(x, y, alpha, generator)
    return 0.5 * (mixed + x), y_a, y_b, lam


def cutmix_per_sample_boxes(x, y, alpha, generator=None):  # a new box for every image
    if alpha <= 0:
        return x.clone(), y, y, 1.0
    H, W = x.shape[-2:]
    perm = torch.randperm(len(x), generator=generator)
    mixed, kept = x.clone(), []
    for i in range(len(x)):
        top, bottom, left, right, _ = _box(x, alpha, generator, (H, W), (H, W))
        mixed[i, :, top:bottom, left:right] = x[perm[i], :, top:bottom, left:right]
        kept.append(1 - (bottom - top) * (right - left) / (H * W))
    return mixed, y, y[perm], sum(kept) / len(kept)


def cutmix_first_channel(x, y, alpha, generator=None):
    mixed, y_a, y_b, lam = vit.cutmix(x, y, alpha, generator)
    out = x.clone()
    out[:, 0] = mixed[:, 0]
    return out, y_a, y_b, lam


def cutmix_uniform_size(x, y, alpha, generator=None):  # ignores alpha for the box size
    if alpha <= 0:
        return x.clone(), y, y, 1.0
    return vit.cutmix(x, y, 1.0, generator)


# --------------------------------------------------------------------------- mixed-label loss


def loss_soft_targets(logits, y_a, y_b, lam):
    C = logits.size(-1)
    target = lam * F.one_hot(y_a, C).to(logits.dtype) + (1 - lam) * F.one_hot(y_b, C).to(logits.dtype)
    return F.cross_entropy(logits, target)


def loss_log_softmax(logits, y_a, y_b, lam):
    logp = logits.log_softmax(-1)
    nll_a = -logp.gather(1, y_a[:, None]).squeeze(1)
    nll_b = -logp.gather(1, y_b[:, None]).squeeze(1)
    return (lam * nll_a + (1 - lam) * nll_b).mean()


def loss_mixed_labels(logits, y_a, y_b, lam):  # mixes class numbers, not distributions
    return F.cross_entropy(logits, (lam * y_a + (1 - lam) * y_b).round().long())


def loss_swapped(logits, y_a, y_b, lam):
    return (1 - lam) * F.cross_entropy(logits, y_a) + lam * F.cross_entropy(logits, y_b)


def loss_summed(logits, y_a, y_b, lam):
    return lam * F.cross_entropy(logits, y_a, reduction="sum") + (1 - lam) * F.cross_entropy(
        logits, y_b, reduction="sum")


def loss_first_label_only(logits, y_a, y_b, lam):
    return F.cross_entropy(logits, y_a)


def loss_item(logits, y_a, y_b, lam):
    return vit.mixed_cross_entropy(logits, y_a, y_b, lam).item()


def loss_per_sample(logits, y_a, y_b, lam):
    return lam * F.cross_entropy(logits, y_a, reduction="none") + (1 - lam) * F.cross_entropy(
        logits, y_b, reduction="none")


def loss_detached(logits, y_a, y_b, lam):
    return vit.mixed_cross_entropy(logits.detach(), y_a, y_b, lam)


CORRECT = {
    "patch_embedding": [PatchByUnfold, PatchPermute],
    "vision_transformer": [ViTSplitPositions],
    "mixup": [mixup_lerp],
    "cutmix": [cutmix_mask],
    "mixed_cross_entropy": [loss_soft_targets, loss_log_softmax],
}

# (wrong answer, a phrase the verdict must contain, or "" when any failure will do)
WRONG = {
    "patch_embedding": [
        (PatchColumnMajor, "列優先"),
        (PatchNoTranspose, "transpose"),
        (PatchOverlapping, "stride"),
        (PatchLinear, "nn.Conv2d ではありません"),
        (PatchNoBias, "bias=True"),
        (PatchThreeChannels, "パラメータの形"),
        (PatchWithGelu, "一致しません"),
    ],
    "vision_transformer": [
        (ViTMeanPool, "平均"),
        (ViTNoPositions, "pos_embed が足されていません"),
        (ViTNoFinalNorm, "self.ln"),
        (ViTLastToken, "CLS トークンの位置"),
        (ViTNoDropout, "dropout"),
        (ViTUnitNormalPositions, "N(0, 1)"),
        (ViTPostLN, "一致しません"),
        (ViTClsAtEnd, "一致しません"),
    ],
    "mixup": [
        (mixup_seed_style, "同じシードの generator"),
        (mixup_swapped, "逆"),
        (mixup_per_sample, "サンプルごと"),
        (mixup_uniform, "Beta"),
        (mixup_max, "Beta"),
        (mixup_two_permutations, "同じ 1 つの並べ替え"),
        (mixup_in_place, "書き換えられて"),
        (mixup_no_alpha_check, "ValueError"),
        (mixup_permutes_y_a, "y_a"),
        (mixup_fixed_generator, "シードを変えても"),
    ],
    "cutmix": [
        (cutmix_seed_style, "NumPy 1.24"),
        (cutmix_in_place, "書き換えられて"),
        (cutmix_names_swapped, "実際の割合"),
        (cutmix_aspect_swapped, "取り違えて"),
        (cutmix_unclipped_lam, "実際の割合"),
        (cutmix_pasted_share, "実際の割合"),
        (cutmix_blend, "混ぜ合わせず"),
        (cutmix_per_sample_boxes, "サンプルごと"),
        (cutmix_first_channel, "チャネルごと"),
        (cutmix_uniform_size, "alpha"),
    ],
    "mixed_cross_entropy": [
        (loss_mixed_labels, "ラベル（整数のクラス番号）どうし"),
        (loss_swapped, "逆"),
        (loss_summed, "合計"),
        (loss_first_label_only, "一致しません"),
        (loss_item, "float"),
        (loss_per_sample, "reduction"),
        (loss_detached, "逆伝播"),
    ],
}
