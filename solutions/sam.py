"""Chapter 3: Sharpness-Aware Minimization (SAM, ASAM) and the loss landscape (what the reader reads).

The reference answers of the chapter's exercises (the SAM optimizer, the largest Hessian
eigenvalue by power iteration, filter-normalised directions), the toy losses with a sharp and a
flat minimum, the noisy-label digits task with its training loop, and the landscape plots. The
exercises' tests live in ``solutions/exercises/sam.py``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .instruments import evaluate_classifier

# =======================================================================================
# Reference answers


class SAM(torch.optim.Optimizer):
    """SAM（Foret et al., 2021）: w + ε で測った勾配で、w からベースの最適化手法の 1 ステップを進めます。

    ε = ρ g / ‖g‖（g は w での勾配、ノルムは全パラメータをまとめたもの）。adaptive=True は ASAM
    （Kwon et al., 2021）: ε = ρ T² g / ‖T g‖、T = |w|（成分ごと）。
    """

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        if rho < 0:
            raise ValueError(f"rho は 0 以上にしてください（{rho} が渡されました）")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups  # 2 つの最適化手法で同じグループを共有する
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def _grad_norm(self):
        """全パラメータの勾配（ASAM では |w| を掛けた勾配）をまとめた 1 つのノルム"""
        norms = [((p.abs() if group["adaptive"] else 1.0) * p.grad).norm()
                 for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not norms:
            raise RuntimeError("勾配が 1 つもありません。first_step の前に、w での損失を逆伝播してください")
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).norm()

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        """w を保存してから w + ε に移ります。"""
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = (p.pow(2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                self.state[p]["old_p"] = p.detach().clone()
                p.add_(e_w)  # 損失が最も増える向きへ（上り）
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        """w に正確に戻してから、w + ε で測った勾配でベースの最適化手法の 1 ステップを進めます。"""
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:  # 動かしたパラメータはすべて戻す（いま勾配がなくても）
                    p.copy_(self.state[p].pop("old_p"))  # 引き算ではなくコピー: ビット単位で元どおり
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):
        """closure は勾配を 0 にして順伝播と逆伝播を行い、損失を返す関数。w と w + ε で 1 回ずつ呼びます。"""
        if closure is None:
            raise ValueError("SAM の step には closure（勾配を 0 にして順伝播・逆伝播を行い、"
                             "損失を返す関数）が必要です")
        closure = torch.enable_grad()(closure)
        loss = closure()  # w での勾配
        self.first_step(zero_grad=True)
        closure()  # w + ε での勾配
        self.second_step()
        return loss

    def state_dict(self):
        """ベースの最適化手法の状態（モーメンタムなど）ごと保存します。

        SAM 自身の状態（保存した w）は 1 ステップの途中にしか存在しません。
        """
        return {"base": self.base_optimizer.state_dict()}

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups  # 共有を結び直す


def top_hessian_eigenvalue(model, loss_fn, x, y, iters=50, tol=1e-4, generator=None):
    """損失 loss_fn(model(x), y) のヘッセ行列の、絶対値が最大の固有値（べき乗法）。

    ヘッセ行列そのものは作らず、ヘッセ行列とベクトルの積 Hv を 2 回の逆伝播で求めます。
    v を正規化しながら Hv を繰り返し、レイリー商 vᵀHv の変化が tol（相対）より小さくなったら止めます。
    """
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)  # 勾配のグラフを残して 2 回目の微分に使う
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(sum((u * u).sum() for u in v))
    v = [u / norm for u in v]
    eigenvalue = None
    for _ in range(iters):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)  # H v
        new = sum((h * u).sum() for h, u in zip(hv, v, strict=True)).item()  # vᵀ H v（‖v‖ = 1）
        norm = torch.sqrt(sum((h * h).sum() for h in hv))
        v = [h / norm for h in hv]
        if eigenvalue is not None and abs(new - eigenvalue) <= tol * abs(eigenvalue):
            return new
        eigenvalue = new
    return eigenvalue


def filter_normalized_direction(model, generator=None):
    """Li et al.（2018）のフィルタ正規化した乱数の方向: パラメータと同じ形状のテンソルのリスト。

    重み（2 次元以上）は出力の 1 単位（フィルタ、行）ごとに、乱数の方向のノルムをその行のパラメータの
    ノルムにそろえます。バイアスや正規化層の 1 次元のパラメータの方向は 0 にします。
    """
    direction = []
    for p in model.parameters():
        if p.dim() <= 1:
            direction.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        d_rows, p_rows = d.flatten(1), p.detach().flatten(1)  # (出力の単位, それ以外)
        d_rows = d_rows * (p_rows.norm(dim=1, keepdim=True) / (d_rows.norm(dim=1, keepdim=True) + 1e-10))
        direction.append(d_rows.view_as(p))
    return direction


# =======================================================================================
# Toy losses: two minima of equal depth, one sharp and one flat


def _toy(r2_flat, r2_sharp, bowl=0.1, flat_width=0.7, sharp_width=0.2, sharp_depth=1.0):
    return bowl * r2_flat - torch.exp(-r2_flat / (2 * flat_width**2)) - sharp_depth * torch.exp(
        -r2_sharp / (2 * sharp_width**2))


def _sharp_depth(distance, bowl=0.1, flat_width=0.7):
    """鋭い井戸の深さ: その底の値が平坦な井戸の底（原点、値 -1）と同じになるように決めます。"""
    return bowl * distance**2 - math.exp(-(distance**2) / (2 * flat_width**2)) + 1


def toy_loss_1d(w, sharp_at=-1.0):
    """原点に平坦な井戸、sharp_at に鋭い井戸（底の深さはほぼ同じ）、全体にゆるいお椀形を足した損失。"""
    depth = _sharp_depth(abs(sharp_at))
    return _toy(w**2, (w - sharp_at) ** 2, sharp_depth=depth)


def toy_loss_2d(w, sharp_at=(-1.0, 0.5)):
    """2 次元版（w: (..., 2)）。原点に平坦な井戸、sharp_at に鋭い井戸。"""
    d = torch.tensor(sharp_at, dtype=w.dtype)
    depth = _sharp_depth(d.norm().item())
    return _toy((w**2).sum(-1), ((w - d) ** 2).sum(-1), sharp_depth=depth)


def sam_objective_1d(loss_fn, w_grid, rho):
    """SAM の目的関数 max_{|ε| ≤ ρ} L(w + ε) を、等間隔の格子の上で正確に（窓の中の最大値で）求めます。"""
    values = loss_fn(w_grid)
    step = (w_grid[1] - w_grid[0]).item()
    k = max(round(rho / step), 0)
    padded = F.pad(values[None, None], (k, k), mode="replicate")[0, 0]
    return padded.unfold(0, 2 * k + 1, 1).max(-1).values


def toy_trajectory(loss_fn, start, steps, lr, rho=0.0):
    """勾配降下法（rho=0）または SAM（rho>0）で、人工的な損失関数の上を進んだ点の列 (steps + 1, dim)。"""
    w = torch.as_tensor(start, dtype=torch.float64).clone().requires_grad_(True)
    path = [w.detach().clone()]
    for _ in range(steps):
        (g,) = torch.autograd.grad(loss_fn(w), w)
        if rho > 0:
            eps = rho * g / (g.norm() + 1e-12)
            (g,) = torch.autograd.grad(loss_fn(w + eps), w)  # w + ε で測った勾配
        with torch.no_grad():
            w -= lr * g
        path.append(w.detach().clone())
    return torch.stack(path)


# =======================================================================================
# Data: digits with noisy training labels


@dataclass
class NoisyDigits:
    train_x: torch.Tensor  # (N, 64), standardized
    train_y: torch.Tensor  # noisy labels used for training
    clean_y: torch.Tensor  # the true labels of the training images
    test_x: torch.Tensor
    test_y: torch.Tensor  # test labels are never corrupted
    noise: float

    @property
    def flipped(self) -> torch.Tensor:
        return self.train_y != self.clean_y


def load_noisy_digits(noise=0.3, test_fraction=0.2, seed=0) -> NoisyDigits:
    """scikit-learn の digits（8×8 を 64 次元のベクトルに）。学習データのラベルの noise の割合を、
    正解以外の 9 クラスから一様に選んだラベルに置き換えます。テストデータのラベルはそのまま。"""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=digits.target,
                                           random_state=seed)
    train_x, test_x = x[idx_train], x[idx_test]
    mean, std = train_x.mean(0), train_x.std(0) + 1e-3
    clean = y[idx_train]
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(clean), generator=g) < noise
    other = (clean + torch.randint(1, 10, (len(clean),), generator=g)) % 10  # 正解以外のクラス
    noisy = torch.where(flip, other, clean)
    return NoisyDigits((train_x - mean) / std, noisy, clean, (test_x - mean) / std, y[idx_test], noise)


def make_mlp(hidden=256, n_in=64, n_out=10, batch_norm=True):
    """2 層の隠れ層を持つ MLP（BatchNorm つき）。"""
    def block(i, o):
        return [nn.Linear(i, o), *([nn.BatchNorm1d(o)] if batch_norm else []), nn.ReLU()]
    return nn.Sequential(*block(n_in, hidden), *block(hidden, hidden), nn.Linear(hidden, n_out))


@contextlib.contextmanager
def running_stats_frozen(model):
    """この中の順伝播では BatchNorm の移動平均（running_mean / running_var）を更新しません。

    SAM の 2 回目の順伝播（w + ε）で統計を二重に数えないために使います。バッチの統計での正規化は
    学習モードのまま行われます。
    """
    saved = {}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved[m] = m.momentum
            m.momentum = 0.0  # 移動平均 = (1 - 0)·古い値 + 0·新しい値 = 古い値のまま
    try:
        yield
    finally:
        for m, momentum in saved.items():
            m.momentum = momentum


evaluate = evaluate_classifier  # 交差エントロピーの平均と正解率（評価モード）。共通の道具を使います


OPTIMIZERS = ("sgd", "sam", "asam")


def make_optimizer(kind, params, lr=0.05, momentum=0.9, weight_decay=5e-4, rho=None, sam_cls=SAM):
    """'sgd'、'sam'（rho 既定 0.05）、'asam'（rho 既定 0.5）。ベースはモーメンタムつき SGD。"""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind in ("sam", "asam"):
        rho = rho if rho is not None else (0.05 if kind == "sam" else 0.5)
        return sam_cls(params, torch.optim.SGD, rho=rho, adaptive=kind == "asam", lr=lr, momentum=momentum,
                       weight_decay=weight_decay)
    raise ValueError(f"kind は {OPTIMIZERS} のどれかにしてください（{kind!r} が渡されました）")


def train(model, data, optimizer, epochs, batch_size=64, seed=0, freeze_bn_in_second_pass=True):
    """1 エポック = シャッフルした学習データを 1 周。SAM なら 1 ステップで 2 回の順伝播・逆伝播を行います。

    学習率はコサイン減衰で 0 まで下げます。返り値は履歴: ステップごとの学習損失（誤ったラベルを含む
    学習データで測ったもの）、エポックごとのテスト正解率、勾配の計算回数、かかった秒数。
    """
    is_sam = hasattr(optimizer, "first_step")
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(data.train_x) / batch_size)
    base = optimizer.base_optimizer if is_sam else optimizer
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=epochs * steps_per_epoch)
    history = {"train_loss": [], "epoch": [], "test_acc": [], "grad_evals": 0}
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(data.train_x), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x, y = data.train_x[idx], data.train_y[idx]
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if is_sam:
                optimizer.first_step(zero_grad=True)
                frozen = running_stats_frozen(model) if freeze_bn_in_second_pass else contextlib.nullcontext()
                with frozen:
                    F.cross_entropy(model(x), y).backward()
                optimizer.second_step(zero_grad=True)
            else:
                optimizer.step()
            scheduler.step()
            history["train_loss"].append(loss.item())
            history["grad_evals"] += 2 if is_sam else 1
        history["epoch"].append(epoch + 1)
        history["test_acc"].append(evaluate(model, data.test_x, data.test_y)["accuracy"])
    history["seconds"] = time.perf_counter() - start
    return history


# =======================================================================================
# Landscapes and cost


@torch.no_grad()
def loss_along(model, directions, coords, x, y):
    """パラメータを w + Σ coords[i]·directions[i] に動かしたときの損失（評価モード）。元には必ず戻します。

    directions: 方向（パラメータと同じ形状のテンソルのリスト）のリスト。coords: (点の数, 方向の数)。
    """
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    was_training = model.training
    model.eval()
    losses = []
    try:
        for c in coords:
            for p, w, *ds in zip(params, saved, *directions, strict=True):
                p.copy_(w + sum(float(ci) * d for ci, d in zip(c, ds, strict=True)))
            losses.append(F.cross_entropy(model(x), y).item())
    finally:
        for p, w in zip(params, saved, strict=True):
            p.copy_(w)
        model.train(was_training)
    return torch.tensor(losses)


def step_time_ms(kind, data, batch_size=64, repeats=20, hidden=256):
    """1 ステップ（SAM なら 2 回の順伝播・逆伝播を含む）の時間の中央値（ミリ秒）。"""
    from .instruments import time_ms

    torch.manual_seed(0)
    model = make_mlp(hidden)
    opt = make_optimizer(kind, model.parameters())
    x, y = data.train_x[:batch_size], data.train_y[:batch_size]

    def one_step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if hasattr(opt, "first_step"):
            opt.first_step(zero_grad=True)
            with running_stats_frozen(model):
                F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.step()

    return time_ms(one_step, repeats=repeats, warmup=3)
