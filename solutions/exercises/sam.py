"""Chapter 3's exercises: their registrations and the tests that grade a reader's answer.

The SAM tests compute the expected step by hand with torch.func (gradient at w, the perturbation,
the gradient at w + ε, then SGD with momentum and weight decay from w) and compare the reader's
parameters after each phase; well-known mistakes are named by recomputing their outcome.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad

from ..checker import CheckFailed, expect_close, register
from ..sam import SAM, filter_normalized_direction, top_hessian_eigenvalue

CHAPTER = "03_sam"

LR, MOMENTUM, WD = 0.1, 0.9, 0.1  # weight decay makes a base step taken at w + ε visible


def _net(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(device)


def _batch(seed=0, n=16, device="cpu"):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(n, 5, generator=g).to(device), torch.randint(3, (n,), generator=g).to(device)


def _loss_of(model, x, y):
    def loss(params):
        return F.cross_entropy(functional_call(model, params, (x,)), y)
    return loss


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _perturbation(g, w, rho, adaptive, per_tensor=False, sign=1.0):
    """ε for every parameter: ρ g / ‖g‖ (ASAM: ρ w² g / ‖|w| g‖), the norm global unless per_tensor."""
    scaled = {k: (w[k].abs() if adaptive else 1.0) * g[k] for k in g}
    total = torch.sqrt(sum((s * s).sum() for s in scaled.values()))
    return {k: sign * rho * (w[k] ** 2 if adaptive else 1.0) * g[k]
            / ((scaled[k].norm() if per_tensor else total) + 1e-12) for k in g}


def _sgd_step(w, g, lr=LR, wd=WD):
    """The first SGD step with momentum (the buffer starts as the gradient) and weight decay."""
    return {k: w[k] - lr * (g[k] + wd * w[k]) for k in w}


def _expected(model, x, y, rho, adaptive=False):
    """Everything one SAM step should produce, and what well-known mistakes would produce."""
    loss = _loss_of(model, x, y)
    w = _params(model)
    g = grad(loss)(w)
    eps = _perturbation(g, w, rho, adaptive)
    w_eps = {k: w[k] + eps[k] for k in w}
    g_eps = grad(loss)(w_eps)
    return {
        "w": w, "g": g, "w_eps": w_eps, "g_eps": g_eps,
        "after": _sgd_step(w, g_eps),
        "base_step_at_w_eps": _sgd_step(w_eps, g_eps),
        "base_update_from_w_eps": {k: w[k] - LR * (g_eps[k] + WD * w_eps[k]) for k in w},
        "gradient_at_w": _sgd_step(w, g),
    }


def _same(a: dict, b: dict, atol=1e-6, rtol=1e-5):
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=rtol) for k in a)


def _build(answer, model, rho=0.05, adaptive=False, **kwargs):
    try:
        opt = answer(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=LR, momentum=MOMENTUM,
                     weight_decay=WD, **kwargs)
    except TypeError as e:
        raise CheckFailed("SAM(params, base_optimizer, rho=..., adaptive=..., **kwargs) の形で作れません: "
                          f"{e}") from None
    if not isinstance(opt, torch.optim.Optimizer):
        raise CheckFailed("SAM は torch.optim.Optimizer を継承してください"
                          "（学習率のスケジューラなどと組み合わせるため）。")
    for name in ("first_step", "second_step", "step"):
        if not callable(getattr(opt, name, None)):
            raise CheckFailed(f"メソッド {name} がありません。")
    return opt


def _one_round(opt, model, x, y):
    """One SAM step driven by hand: gradient at w, first_step, gradient at w + ε, second_step."""
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def _first_step_case(answer, rho, adaptive, seed=0, device="cpu"):
    model = _net(seed, device)
    x, y = _batch(seed, device=device)
    exp = _expected(model, x, y, rho, adaptive)
    opt = _build(answer, model, rho, adaptive)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    now = _params(model)
    if _same(now, exp["w"], atol=0, rtol=0) and rho > 0:
        raise CheckFailed("first_step のあとでパラメータが動いていません。w + ε に移してください。")
    if not _same(now, exp["w_eps"]):
        w, g = exp["w"], exp["g"]
        moved = torch.sqrt(sum(((now[k] - w[k]) ** 2).sum() for k in w)).item()
        candidates = {
            "ε の向きが逆です（勾配を引いています）。SAM は損失が最も増える向き（+g）へ動かします。":
                _perturbation(g, w, rho, adaptive, sign=-1.0),
            "勾配のノルムをテンソルごとに取っています。ε = ρ g / ‖g‖ のノルムは、全パラメータの勾配をまとめた 1 つの"
            "ノルムです。": _perturbation(g, w, rho, adaptive, per_tensor=True),
        }
        if adaptive:
            candidates["adaptive=True（ASAM）の式が違います。ε = ρ T² g / ‖T g‖、T = |w|（成分ごと）です。"
                       "adaptive を無視していませんか。"] = _perturbation(g, w, rho, False)
        for reason, eps in candidates.items():
            if _same(now, {k: w[k] + eps[k] for k in w}):
                raise CheckFailed(reason)
        if not adaptive and abs(moved - rho) > 1e-4 * max(rho, 1):
            raise CheckFailed(f"first_step で動いた距離（全パラメータをまとめたノルム）が {moved:.4g} ですが、"
                              f"rho = {rho} のはずです。rho を使っていますか（ε = ρ g / ‖g‖）。")
        expect_close(torch.cat([now[k].flatten() for k in now]), torch.cat([exp["w_eps"][k].flatten() for k in now]),
                     "first_step のあとのパラメータ", atol=1e-6, rtol=1e-5,
                     hint="first_step では w + ε（ε = ρ g / ‖g‖）に移します。")
    if any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()):
        raise CheckFailed("first_step(zero_grad=True) のあとで勾配が 0 になっていません。")
    return model, x, y, opt, exp


def _full_step_case(answer, rho, adaptive=False, seed=0, device="cpu"):
    model, x, y, opt, exp = _first_step_case(answer, rho, adaptive, seed, device)
    F.cross_entropy(model(x), y).backward()  # the gradient at w + ε
    opt.second_step(zero_grad=True)
    now = _params(model)
    if _same(now, exp["after"]):
        return
    if _same(now, exp["base_step_at_w_eps"]):
        raise CheckFailed("ベースの最適化手法の 1 ステップを w + ε から進めています。second_step では先に w に戻し、"
                          "それから base_optimizer.step() を呼びます（重み減衰が w + ε にかかってしまいます）。")
    if _same(now, exp["base_update_from_w_eps"]):
        raise CheckFailed("ベースの最適化手法の 1 ステップを w + ε で計算し、その差分を w に足しています"
                          "（重み減衰が w + ε にかかります）。second_step では先に w に戻してから "
                          "base_optimizer.step() を呼びます。")
    w_eps = exp["w_eps"]
    if _same(now, w_eps):
        raise CheckFailed("second_step で w に戻していません（w + ε のままベースの 1 ステップを進めています）。")
    expect_close(torch.cat([now[k].flatten() for k in now]), torch.cat([exp["after"][k].flatten() for k in now]),
                 "second_step のあとのパラメータ", atol=1e-6, rtol=1e-5,
                 hint="second_step では、first_step で保存した w にそのまま戻してから、w + ε で測った勾配のまま "
                      "base_optimizer.step() を呼びます。")


def _register_sam():
    ex = register("sam", "SAM（と ASAM）の最適化手法", chapter=CHAPTER, reference=SAM)

    @ex.test("first_step で w + ε（ε = ρ g / ‖g‖、ノルムは全パラメータで 1 つ）に移る")
    def _(answer, ref):
        for seed, rho in ((0, 0.05), (1, 0.5)):
            _first_step_case(answer, rho, adaptive=False, seed=seed)

    @ex.test("second_step で w に戻し、w + ε で測った勾配で SGD（モーメンタム・重み減衰つき）の 1 ステップを進める")
    def _(answer, ref):
        for seed, rho in ((0, 0.05), (2, 0.3)):
            _full_step_case(answer, rho, seed=seed)

    @ex.test("adaptive=True（ASAM）: ε = ρ T² g / ‖T g‖、T = |w|")
    def _(answer, ref):
        _full_step_case(answer, 0.5, adaptive=True, seed=3)

    @ex.test("second_step で戻した w は、first_step の前とビット単位で同じ（lr = 0 で確かめる）")
    def _(answer, ref):
        model = _net(4)
        x, y = _batch(4)
        before = _params(model)
        opt = answer(model.parameters(), torch.optim.SGD, rho=1.7, lr=0.0)
        for _ in range(3):
            _one_round(opt, model, x, y)
        for k, v in _params(model).items():
            if not torch.equal(v, before[k]):
                raise CheckFailed("w に戻したパラメータが元の値とビット単位では一致しません（最大の差 "
                                  f"{(v - before[k]).abs().max().item():.2e}）。ε を引いて戻すと丸め誤差が残るので、"
                                  "first_step で保存した w をコピーして戻してください。")

    @ex.test("rho = 0 なら、ベースの最適化手法だけで 3 ステップ進めたのと同じ")
    def _(answer, ref):
        a, b = _net(5), _net(5)
        x, y = _batch(5)
        opt = _build(answer, a, rho=0.0)
        base = torch.optim.SGD(b.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
        for _ in range(3):
            _one_round(opt, a, x, y)
            base.zero_grad()
            F.cross_entropy(b(x), y).backward()
            base.step()
        if not _same(_params(a), _params(b)):
            raise CheckFailed("rho = 0 なのに、ベースの最適化手法（SGD）だけの場合と結果が違います。2 歩目以降の"
                              "モーメンタムは base_optimizer の状態に任せ、SAM 側で別に持たないでください。")

    @ex.test("param_groups をベースの最適化手法と共有する（学習率を変えると base の 1 ステップに効く）")
    def _(answer, ref):
        model = _net(6)
        x, y = _batch(6)
        opt = _build(answer, model, rho=0.1)
        for group in opt.param_groups:
            group["lr"] = 0.0  # what a learning-rate scheduler does
        before = _params(model)
        _one_round(opt, model, x, y)
        if not _same(_params(model), before, atol=1e-6, rtol=0):
            raise CheckFailed("SAM の param_groups の学習率を 0 にしても、パラメータが動きました。base_optimizer を "
                              "self.param_groups で作り、self.param_groups = self.base_optimizer.param_groups と"
                              "共有してください（学習率のスケジューラが SAM に付いても効くように）。")

    @ex.test("rho の違う 2 つのパラメータグループ（ノルムは全体で 1 つ、ε はグループごとの rho）")
    def _(answer, ref):
        model = _net(7)
        x, y = _batch(7)
        w = _params(model)
        g = grad(_loss_of(model, x, y))(w)
        groups = [{"params": list(model[0].parameters()), "rho": 0.05},
                  {"params": list(model[2].parameters()), "rho": 0.4}]
        opt = answer(groups, torch.optim.SGD, rho=0.1, lr=LR)
        F.cross_entropy(model(x), y).backward()
        opt.first_step()
        total = torch.sqrt(sum((v * v).sum() for v in g.values()))
        for k, v in _params(model).items():
            rho = 0.05 if k.startswith("0.") else 0.4
            expect_close(v, w[k] + rho * g[k] / total, f"first_step のあとの {k}",
                         hint="ε は各グループの rho を使い、ノルムは全グループの勾配をまとめた 1 つのものです。")

    @ex.test("first_step で動かしたパラメータは、2 回目に勾配がなくても second_step で戻す")
    def _(answer, ref):
        model = _net(8)
        x, y = _batch(8)
        before = _params(model)
        opt = answer(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.0)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)  # set_to_none: the gradients are None now
        model[2].bias.grad = None
        model(x).sum().backward()
        model[2].bias.grad = None  # as if the second loss did not depend on this parameter
        opt.second_step(zero_grad=True)
        if not torch.equal(model[2].bias.detach(), before["2.bias"]):
            raise CheckFailed("2 回目の逆伝播で勾配が None だったパラメータが、w + ε のまま残っています。"
                              "戻すかどうかは p.grad ではなく、first_step で w を保存したかどうかで決めてください。")

    @ex.test("step(closure): closure を w と w + ε で呼び、1 ステップで first_step + second_step と同じ結果")
    def _(answer, ref):
        model = _net(9)
        x, y = _batch(9)
        exp = _expected(model, x, y, 0.1)
        opt = _build(answer, model, rho=0.1)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        try:
            opt.step(closure)  # no gradient yet: step itself must compute the one at w
        except Exception as e:  # a reader's error, reported with the likely cause
            raise CheckFailed(f"勾配がまだない状態で step(closure) を呼ぶと {type(e).__name__} になりました: {e}。"
                              "step の中で、まず closure() を呼んで w での勾配を計算してください。") from None
        if not _same(_params(model), exp["after"]):
            raise CheckFailed("step(closure) の結果が、first_step → closure() → second_step と違います。")

    @ex.gpu_test
    def _(answer, ref, device):
        _full_step_case(answer, 0.1, seed=10, device=device)


# ------------------------------------------------------------------------ sharpness


def _hessian_top(model, x, y, loss_fn):
    """The eigenvalue of largest magnitude of the full Hessian, by torch.autograd.functional.hessian."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def f(flat):
        params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        return loss_fn(functional_call(model, params, (x,)), y)

    h = torch.autograd.functional.hessian(f, flat0)
    eig = torch.linalg.eigvalsh((h + h.T) / 2)
    return eig[eig.abs().argmax()].item()


def _register_sharpness():
    ex = register("top_hessian_eigenvalue", "ヘッセ行列の最大固有値（べき乗法）", chapter=CHAPTER,
                  reference=top_hessian_eigenvalue)

    def call(answer, model, loss_fn, x, y, **kwargs):
        before = _params(model)
        value = answer(model, loss_fn, x, y, **kwargs)
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise CheckFailed(f"固有値は 1 つの数のはずですが、形状 {tuple(value.shape)} のテンソルが返りました。")
            value = value.item()
        if not isinstance(value, (int, float)):
            raise CheckFailed(f"固有値は数（float）で返してください（{type(value).__name__} が返りました）。")
        if not _same(_params(model), before, atol=0, rtol=0):
            raise CheckFailed("関数の中でモデルのパラメータを書き換えています。")
        if any(p.grad is not None for p in model.parameters()):
            raise CheckFailed("モデルの .grad に値が残っています。loss.backward() ではなく torch.autograd.grad で"
                              "勾配とヘッセ行列・ベクトル積を求めてください。")
        return float(value)

    @ex.test("線形回帰の二乗誤差: 最大固有値 = (2/n) XᵀX の最大固有値")
    def _(answer, ref):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 4, generator=g) * torch.tensor([3.0, 1.0, 0.5, 0.2])
        y = torch.randn(40, 1, generator=g)
        model = nn.Linear(4, 1, bias=False)
        expected = torch.linalg.eigvalsh(2 * x.T @ x / 40).max().item()
        got = call(answer, model, F.mse_loss, x, y, iters=200, tol=1e-7, generator=torch.Generator().manual_seed(1))
        if abs(got - expected) > 1e-3 * expected:
            hint = ""
            grad_norm = torch.autograd.grad(F.mse_loss(model(x), y), model.weight)[0].norm().item()
            if abs(got - grad_norm) < 1e-4 * max(grad_norm, 1):
                hint = "勾配のノルムを返しています。ヘッセ行列とベクトルの積 Hv を繰り返してください。"
            raise CheckFailed(f"最大固有値は {expected:.5g} のはずですが、{got:.5g} が返りました。{hint}")

    @ex.test("小さなネットワークの交差エントロピー: torch.autograd.functional.hessian の固有値と一致する")
    def _(answer, ref):
        model = _net(11)
        x, y = _batch(11, n=32)
        expected = _hessian_top(model, x, y, F.cross_entropy)
        got = call(answer, model, F.cross_entropy, x, y, iters=500, tol=1e-9,
                   generator=torch.Generator().manual_seed(2))
        if abs(got - expected) > 1e-2 * abs(expected):
            raise CheckFailed(f"絶対値が最大の固有値は {expected:.5g} のはずですが、{got:.5g} が返りました。"
                              "v を毎回正規化し、vᵀHv（レイリー商）を返していますか。")


# ------------------------------------------------------------------------ directions


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def _register_directions():
    ex = register("filter_normalized_direction", "フィルタ正規化した方向", chapter=CHAPTER,
                  reference=filter_normalized_direction)

    def call(answer, model, seed):
        before = _params(model)
        d = answer(model, torch.Generator().manual_seed(seed))
        params = list(model.named_parameters())
        if not isinstance(d, (list, tuple)) or len(d) != len(params):
            raise CheckFailed(f"パラメータと同じ数（{len(params)} 個）のテンソルのリストを返してください。")
        for (name, p), t in zip(params, d, strict=True):
            if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                raise CheckFailed(f"{name} の方向の形状は {tuple(p.shape)} のはずです。")
        if not _same(_params(model), before, atol=0, rtol=0):
            raise CheckFailed("関数の中でモデルのパラメータを書き換えています。")
        return d

    def check_model(answer, model):
        d = call(answer, model, 0)
        for (name, p), t in zip(model.named_parameters(), d, strict=True):
            if p.dim() <= 1:
                if t.abs().max() > 0:
                    raise CheckFailed(f"{name}（1 次元のパラメータ: バイアスや正規化層）の方向は 0 にします"
                                      "（Li et al.）。")
                continue
            rows_d, rows_p = t.detach().flatten(1), p.detach().flatten(1)
            cos = F.cosine_similarity(rows_d, rows_p, dim=1).abs()
            if (cos > 0.999).all():
                raise CheckFailed(f"{name} の方向がパラメータそのものと同じ向きです。"
                                  "乱数（torch.randn）で方向を作ってから、ノルムだけをそろえます。")
            norm_d, norm_p = rows_d.norm(dim=1), rows_p.norm(dim=1)
            if not torch.allclose(norm_d, norm_p, rtol=1e-4, atol=1e-6):
                per_filter = "フィルタ（出力の 1 単位、dim 0 の 1 行）ごとにそろえます。"
                if torch.allclose(rows_d.norm(dim=0), rows_p.norm(dim=0), rtol=1e-4, atol=1e-6):
                    why = "列（dim 1）ごとにノルムをそろえています。" + per_filter
                elif torch.allclose(t.norm(), p.norm(), rtol=1e-4):
                    why = "テンソル全体（層ごと）でノルムをそろえています。" + per_filter
                elif torch.allclose(norm_d, torch.ones_like(norm_d), rtol=1e-4):
                    why = "各行のノルムを 1 にしています。その行のパラメータのノルム ‖w_i‖ に合わせます。"
                else:
                    why = "フィルタ（dim 0 の 1 行）ごとのノルムが、パラメータの同じ行のノルムと一致しません。"
                raise CheckFailed(f"{name}: {why}")
        return d

    @ex.test("全結合のネットワーク: 重みは行ごとにノルムをそろえ、バイアスは 0")
    def _(answer, ref):
        check_model(answer, _net(12))

    @ex.test("畳み込みと BatchNorm: 畳み込みの重みはフィルタごと、BatchNorm の重みとバイアスは 0")
    def _(answer, ref):
        torch.manual_seed(13)
        check_model(answer, _ConvNet())

    @ex.test("同じシードの generator なら同じ方向、違うシードなら違う方向")
    def _(answer, ref):
        model = _net(14)
        a, b, c = call(answer, model, 0), call(answer, model, 0), call(answer, model, 1)
        if not all(torch.equal(u, v) for u, v in zip(a, b, strict=True)):
            raise CheckFailed("同じシードの generator でも違う方向が返りました。乱数は generator から引いてください。")
        if all(torch.equal(u, v) for u, v in zip(a, c, strict=True)):
            raise CheckFailed("generator のシードを変えても同じ方向が返りました。")


_register_sam()
_register_sharpness()
_register_directions()
