"""Chapter 2: Vision Transformer, Mixup and CutMix (what the reader reads).

The reference answers of the chapter's exercises (patch embedding, the ViT, Mixup, CutMix and
the loss for mixed labels), the digits data set as images, the training loop with its
augmentation switch, the linear baseline, and the instruments that look inside a trained ViT
(attention from the CLS token, attention rollout, similarity of the positional embeddings).
The Pre-LN block comes from chapter 1 (``solutions.transformer``). The exercises' tests live
in ``solutions/exercises/vit.py``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .instruments import evaluate_classifier, record_outputs
from .transformer import TransformerBlock

# =======================================================================================
# Reference answers


class PatchEmbedding(nn.Module):
    """画像を patch_size × patch_size のパッチに切り、各パッチを d_model 次元に射影します。

    kernel_size と stride がどちらもパッチの大きさの Conv2d は、各パッチをちょうど 1 回ずつ見て、
    どのパッチにも同じ線形写像をかけます。つまり「unfold + 共有の nn.Linear」と同じ計算です。
    """

    def __init__(self, img_size, patch_size, in_channels, d_model):
        super().__init__()
        assert img_size % patch_size == 0, "img_size は patch_size で割り切れる必要があります"
        self.n_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, d_model, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, C, H, W) -> (B, n_patches, d_model)
        x = self.proj(x)  # (B, d_model, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, d_model, n_patches) -> (B, n_patches, d_model)、行優先


class VisionTransformer(nn.Module):
    """ViT: パッチ + CLS トークン + 学習可能な位置埋め込み → Pre-LN ブロック → 層正規化 → CLS から分類。"""

    def __init__(self, img_size, patch_size, in_channels, n_classes, d_model, n_heads, n_layers, d_ff,
                 dropout=0.0):
        super().__init__()
        self.patch_embed = PatchEmbedding(img_size, patch_size, in_channels, d_model)
        n_tokens = self.patch_embed.n_patches + 1  # パッチと CLS トークン
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, d_model))
        nn.init.normal_(self.pos_embed, std=0.02)  # ViT（BERT 由来）と同じく小さく。N(0, 1) ではない
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([TransformerBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x):  # (B, C, H, W) -> (B, n_classes)
        x = self.patch_embed(x)  # (B, N, d_model)
        cls = self.cls_token.expand(x.size(0), -1, -1)  # (B, 1, d_model)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, N + 1, d_model)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)  # マスクなし: どのトークンもすべてのトークンを見る
        return self.head(self.ln(x[:, 0]))  # 最後のブロックを出た CLS トークンから分類


def mixup(x, y, alpha, generator=None):
    """Mixup: mixed_x = lam * x + (1 - lam) * x[perm]、lam ~ Beta(alpha, alpha)。alpha <= 0 なら lam = 1。"""
    lam = beta_sample(alpha, generator) if alpha > 0 else 1.0
    perm = torch.randperm(x.size(0), generator=generator).to(x.device)  # バッチで 1 つの並べ替え
    mixed_x = lam * x + (1 - lam) * x[perm]
    return mixed_x, y, y[perm], lam


def cutmix(x, y, alpha, generator=None):
    """CutMix: x[perm] の矩形領域 1 つを x のコピーに貼る。lam は x のまま残った画素の正確な割合。"""
    if alpha <= 0:
        return x.clone(), y, y, 1.0
    H, W = x.shape[-2:]  # NCHW: 高さは軸 2、幅は軸 3
    lam0 = beta_sample(alpha, generator)
    cut = math.sqrt(1 - lam0)  # 領域の面積がおよそ 1 - lam0 になる
    cut_h, cut_w = int(H * cut), int(W * cut)
    cy = int(torch.randint(H, (), generator=generator))  # 領域の中心は画像全体から一様に
    cx = int(torch.randint(W, (), generator=generator))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)  # 画像の端で切り詰める
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
    perm = torch.randperm(x.size(0), generator=generator).to(x.device)
    mixed_x = x.clone()  # 呼び出し側の x には書き込まない
    mixed_x[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
    lam = 1 - (bottom - top) * (right - left) / (H * W)  # 切り詰めたあとの実際の面積から
    return mixed_x, y, y[perm], lam


def mixed_cross_entropy(logits, y_a, y_b, lam):
    """混ぜたラベル lam * onehot(y_a) + (1 - lam) * onehot(y_b) に対する交差エントロピー（バッチ平均）。"""
    return lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)


# =======================================================================================
# Helpers the exercises may use


def beta_sample(alpha, generator=None):
    """Beta(alpha, alpha) から 1 回引いた値（float）。torch.Generator で再現できます。

    PyTorch の torch.distributions.Beta はグローバルな乱数しか使えないので、generator（None なら
    グローバルな乱数）から整数のシードを 1 つ引き、それで作った NumPy の乱数生成器で引きます。
    """
    seed = int(torch.randint(2**62, (), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


# =======================================================================================
# Data: scikit-learn's digits as NCHW images (shipped with the package, no download)


@dataclass
class ImageData:
    train_x: torch.Tensor  # (N, 1, S, S), standardized
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: float
    std: float

    @property
    def img_size(self) -> int:
        return self.train_x.shape[-1]

    @property
    def n_classes(self) -> int:
        return int(self.train_y.max()) + 1

    def to_pixels(self, x):
        """Undo the standardization (for plotting): values back in [0, 1]."""
        return (x * self.std + self.mean).clamp(0, 1)


def load_digits_images(size=8, test_fraction=0.2, seed=0) -> ImageData:
    """The 1,797 8×8 digits of scikit-learn, split by class (stratified), as (N, 1, size, size).

    ``size`` > 8 upsamples bilinearly (the gpu profile uses it for a finer patch grid; no new
    information is added). Pixels are scaled to [0, 1] and standardized with the training
    split's mean and standard deviation.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.int64)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=digits.target,
                                           random_state=seed)
    train_x, test_x = x[idx_train], x[idx_test]
    mean, std = train_x.mean().item(), train_x.std().item()
    return ImageData((train_x - mean) / std, y[idx_train], (test_x - mean) / std, y[idx_test], mean, std)


# =======================================================================================
# Training and evaluation


AUGMENTATIONS = ("none", "mixup", "cutmix", "both")


evaluate = evaluate_classifier  # loss and accuracy on clean images, in eval mode (the shared instrument)


def augment_batch(x, y, augmentation, alpha, generator, mixup_fn=mixup, cutmix_fn=cutmix):
    """(inputs, y_a, y_b, lam) for one batch; "both" picks Mixup or CutMix with probability 1/2."""
    if augmentation == "both":
        augmentation = "mixup" if torch.rand((), generator=generator) < 0.5 else "cutmix"
    if augmentation == "mixup":
        return mixup_fn(x, y, alpha, generator)
    if augmentation == "cutmix":
        return cutmix_fn(x, y, alpha, generator)
    if augmentation == "none":
        return x, y, y, 1.0
    raise ValueError(f"augmentation は {AUGMENTATIONS} のどれかにしてください（{augmentation!r} が渡されました）")


def train_vit(model, data, epochs, batch_size=64, lr=1e-3, device="cpu", augmentation="none", alpha=1.0,
              weight_decay=0.05, warmup_epochs=5, seed=0, mixup_fn=mixup, cutmix_fn=cutmix,
              loss_fn=mixed_cross_entropy):
    """AdamW with linear warm-up and cosine decay (per step), one pass over shuffled data per epoch.

    ``augmentation``: "none", "mixup", "cutmix" or "both" (each batch Mixup or CutMix with
    probability 1/2); ``mixup_fn``, ``cutmix_fn`` and ``loss_fn`` let the chapter train with the
    reader's own functions. The shuffling and the augmentation draw from one generator seeded
    with ``seed``; the model's initialisation is the caller's (seed it before building).

    Returns a history: per step the training loss (on the augmented batch) and the learning
    rate; per epoch the test accuracy; at the end the loss and accuracy on the clean training
    images and the wall time in seconds.
    """
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    steps_per_epoch = math.ceil(len(data.train_x) / batch_size)
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    history = {"step": [], "train_loss": [], "lr": [], "epoch": [], "test_acc": []}
    start, step = time.perf_counter(), 0
    for epoch in range(epochs):
        order = torch.randperm(len(data.train_x), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x, y = data.train_x[idx].to(device), data.train_y[idx].to(device)
            x, y_a, y_b, lam = augment_batch(x, y, augmentation, alpha, generator, mixup_fn, cutmix_fn)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = loss_fn(model(x), y_a, y_b, lam)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history["step"].append(step)
            history["train_loss"].append(loss.item())
            history["lr"].append(lr_at(step))
            step += 1
        history["epoch"].append(epoch + 1)
        history["test_acc"].append(evaluate(model, data.test_x, data.test_y, device)["accuracy"])
    history["seconds"] = time.perf_counter() - start
    clean = evaluate(model, data.train_x, data.train_y, device)
    history["clean_train_loss"], history["clean_train_acc"] = clean["loss"], clean["accuracy"]
    return history


def linear_baseline_accuracy(data) -> float:
    """Test accuracy of multinomial logistic regression on the raw pixels (a linear classifier)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=5000)
    clf.fit(data.train_x.flatten(1).numpy(), data.train_y.numpy())
    return float(clf.score(data.test_x.flatten(1).numpy(), data.test_y.numpy()))


# =======================================================================================
# Looking inside


@torch.no_grad()
def attention_maps(model, x):
    """Attention weights of every block: a list of (B, H, N + 1, N + 1), token 0 the CLS token."""
    model.eval()
    attns = {f"block{i}": block.attn for i, block in enumerate(model.blocks)}
    with record_outputs(attns) as store:
        model(x)
    return [store[name][1] for name in attns]


def attention_rollout(maps):
    """アテンションのロールアウト（Abnar & Zuidema, 2020）: 各ブロックでヘッドを平均し、残差接続の分の
    単位行列を足して行ごとに正規化し、ブロックを順に掛け合わせます。(B, N + 1, N + 1) を返します。"""
    rollout = None
    for weights in maps:
        a = weights.mean(1)  # (B, T, T)、ヘッドの平均
        a = a + torch.eye(a.size(-1), device=a.device)  # 残差接続でトークン自身がそのまま通る分
        a = a / a.sum(-1, keepdim=True)  # 各行の和を 1 に
        rollout = a if rollout is None else a @ rollout
    return rollout


def position_similarity(model):
    """Cosine similarity between the positional embeddings of the patches (not the CLS token):
    (g, g, g, g), entry [i, j] the g × g map of patch (i, j) against every patch."""
    pos = model.pos_embed.detach()[0, 1:]  # (N, d_model)
    g = math.isqrt(pos.size(0))
    pos = F.normalize(pos, dim=-1)
    return (pos @ pos.T).view(g, g, g, g).cpu()


def position_distance_correlation(model) -> float:
    """Pearson correlation, over all pairs of different patches, between the cosine similarity of
    their positional embeddings and minus their distance on the patch grid: near 0 when the
    embeddings carry no 2-D layout, clearly positive when neighbours have similar embeddings."""
    sim = position_similarity(model)
    g = sim.size(0)
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], 1).float()  # (N, 2)
    dist = torch.cdist(coords, coords)  # (N, N), Euclidean distance in patches
    off = ~torch.eye(g * g, dtype=torch.bool)
    s, d = sim.reshape(g * g, g * g)[off], -dist[off]
    return float(torch.corrcoef(torch.stack([s, d]))[0, 1])


# =======================================================================================
# Plots


def show_images(images, titles, data, ncols=None, size=1.6):
    """A row (or grid) of standardized images, back in [0, 1], each with its title."""
    import matplotlib.pyplot as plt

    n = len(images)
    ncols = ncols or n
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(data.to_pixels(img.detach().cpu())[0], cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_position_similarity(model, title):
    """ViT's Figure 7 for this model: for every patch (i, j), the cosine similarity of its positional
    embedding with every patch's, drawn as a small map at grid position (i, j)."""
    import matplotlib.pyplot as plt

    sim = position_similarity(model)
    g = sim.size(0)
    fig, axes = plt.subplots(g, g, figsize=(0.9 * g + 0.8, 0.9 * g + 0.4), squeeze=False)
    for i in range(g):
        for j in range(g):
            im = axes[i, j].imshow(sim[i, j], cmap="viridis", vmin=-1, vmax=1)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.6, label="コサイン類似度")
    fig.suptitle(title)
    return fig
