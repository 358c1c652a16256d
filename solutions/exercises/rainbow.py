"""Chapter 6's exercises: their registrations and the tests that grade a reader's answer.

The sum tree is judged by what it returns against prefix sums computed here, after updates
and overwrites, for capacities that are not powers of two, and by how its time grows with the
capacity. The leaves may lie in any fixed order (a heap layout of 2·capacity − 1 nodes puts them
out of index order when the capacity is not a power of two, and sampling is still proportional to
the priorities): the order is read off with equal priorities first, and the prefix sums follow it.
The projection is compared with a loop over atoms, also when targets land exactly on atoms; the
noisy layer by the statistics of its noise (factorised: rank one, f(x) = sign(x)·√|x|) and by its
outputs in train and eval mode.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..checker import CheckFailed, call_without_mutation, expect_close, expect_tensor, register
from ..rainbow import NoisyLinear, SumTree, project_distribution

CHAPTER = "06_rainbow"


# =======================================================================================
# sum_tree

sum_tree = register("sum_tree", "和木（sum tree）", chapter=CHAPTER, reference=SumTree)


def _build_tree(Answer, priorities):
    try:
        tree = Answer(len(priorities))
        for i, p in enumerate(priorities):
            tree.update(i, float(p))
    except NotImplementedError:
        raise                                             # 未回答として扱う
    except Exception as e:
        raise CheckFailed(f"SumTree({len(priorities)}) を作って update を呼ぶと {type(e).__name__} になりました"
                          f"（{e}）。"
                          "容量が 2 のべき乗でなくても動くようにしてください。") from None
    return tree


_TOTAL_HINT = ("total() は根の値（すべての葉の和）を返します。total() が根の節点を読んでいるか、update で葉を"
               "書き換えたあと、根まですべての親の和を更新しているかを確かめてください。")
_HINT = "右の子に進むときは、value から左の子の和を引きます。左の和より小さければ左へ進みます。"


def _leaf_order(Answer, capacity):
    """The order in which the leaves cover [0, total()): with every priority 1, find(k + 0.5) is the k-th leaf."""
    tree = _build_tree(Answer, np.ones(capacity))
    total = float(tree.total())
    if not math.isclose(total, capacity, rel_tol=1e-9):
        raise CheckFailed(f"容量 {capacity} で優先度をすべて 1 にすると、total() は {capacity} のはずですが "
                          f"{total:.6g} でした。" + _TOTAL_HINT)
    order = [int(tree.find(k + 0.5)) for k in range(capacity)]
    outside = [i for i in order if not 0 <= i < capacity]
    if outside:
        raise CheckFailed(f"容量 {capacity} の木で、find が 0〜{capacity - 1} の外の番号 {outside[0]} を返しました。"
                          "配列 tree の中の位置ではなく、葉の番号（葉の位置 − 最初の葉の位置）を返してください。")
    if sorted(order) != list(range(capacity)):
        repeated = max(set(order), key=order.count)
        raise CheckFailed(f"容量 {capacity} で優先度をすべて 1 にすると、find(k + 0.5)（k = 0, 1, …）は長さ 1 の区間を"
                          f"順にたどり、どの葉もちょうど 1 回ずつ返るはずですが、葉 {repeated} が "
                          f"{order.count(repeated)} 回返りました（find(0.5), find(1.5), … = {order[:8]}…）。" + _HINT)
    return order


def _check_tree(tree, priorities, values, where, order):
    total = float(tree.total())
    if not math.isclose(total, float(np.sum(priorities)), rel_tol=1e-9, abs_tol=1e-12):
        raise CheckFailed(f"{where}: total() が {total:.6g} でしたが、優先度の合計は {np.sum(priorities):.6g} です。"
                          + _TOTAL_HINT)
    ordered = np.asarray(priorities)[order]                 # 葉が区間を並べる順（ふつうは番号の順）
    prefix = np.concatenate([[0.0], np.cumsum(ordered)])
    for v in values:
        k = int(np.searchsorted(prefix, v, side="right") - 1)
        got, expected = int(tree.find(float(v))), order[k]
        if got != expected:
            raise CheckFailed(f"{where}: find({v:.4f}) が {got} を返しましたが、{v:.4f} を含む区間 "
                              f"[{prefix[k]:.4f}, {prefix[k + 1]:.4f}) は葉 {expected} のものです"
                              "（区間は、葉の優先度を左の葉から順に積み上げたものです）。" + _HINT)


@sum_tree.test("容量が 2 のべき乗でなくても、total() が優先度の合計、find(v) が v を含む区間の葉になる")
def _(Answer, reference):
    rng = np.random.default_rng(0)
    for capacity in (1, 5, 13, 64, 100):
        order = _leaf_order(Answer, capacity)
        priorities = rng.uniform(0.1, 3.0, capacity)
        tree = _build_tree(Answer, priorities)
        _check_tree(tree, priorities, rng.uniform(0, priorities.sum(), 50), f"容量 {capacity}", order)


@sum_tree.test("update で書き換えると total() と find が追従し、区間の境目ちょうどの値は右の葉になり、"
               "優先度 0 の葉は選ばれない")
def _(Answer, reference):
    priorities = np.array([1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 5.0])
    order = _leaf_order(Answer, len(priorities))
    tree = _build_tree(Answer, priorities)
    ordered = np.concatenate([[0.0], np.cumsum(priorities[order])])
    boundaries = [*ordered[:-1], ordered[-1] - 1e-3]       # 区間の境目ちょうど（最後は合計の少し手前）
    _check_tree(tree, priorities, boundaries, "境目の値", order)
    for index, p in ((3, 0.5), (0, 0.0), (6, 2.0), (2, 1.5)):
        tree.update(index, p)
        priorities[index] = p
        values = np.linspace(0, priorities.sum() - 1e-9, 23)
        _check_tree(tree, priorities, values, f"葉 {index} を {p} に書き換えたあと", order)


@sum_tree.test("update・find・total の時間が容量の対数でしか増えない（容量 2^10 と 2^20 で比べる）")
def _(Answer, reference):
    def cost(capacity):
        tree = Answer(capacity)
        rng = np.random.default_rng(1)
        idx = rng.integers(0, capacity, 200)
        start = time.perf_counter()
        for i in idx:
            tree.update(int(i), 1.0)
        for _ in range(200):
            tree.find(float(tree.total()) * 0.5)
        return time.perf_counter() - start

    small = min(cost(2 ** 10) for _ in range(3))
    large = min(cost(2 ** 20) for _ in range(3))
    if large > 20 * small:
        raise CheckFailed(f"容量を 1024 倍にすると、update・find・total の時間が {large / small:.0f} 倍になりました。"
                          "どれも根から葉までの 1 本の道をたどるだけ（O(log 容量)）にしてください。すべての葉を見る"
                          "計算（合計を毎回足し直す、葉を先頭から順に調べる）は O(容量) です。")


# =======================================================================================
# project_distribution

projection = register("project_distribution", "C51 の分布の射影", chapter=CHAPTER, reference=project_distribution)


def _projection_by_loop(next_probs, rewards, dones, support, gamma):
    v_min, v_max, n = support[0].item(), support[-1].item(), support.numel()
    dz = (v_max - v_min) / (n - 1)
    out = torch.zeros(next_probs.shape, dtype=torch.float64)
    for i in range(next_probs.shape[0]):
        for j in range(n):
            tz = rewards[i].item() + (0.0 if bool(dones[i]) else gamma * support[j].item())
            b = (min(max(tz, v_min), v_max) - v_min) / dz
            lo, hi = math.floor(b), math.ceil(b)
            p = next_probs[i, j].item()
            if lo == hi:
                out[i, lo] += p
            else:
                out[i, lo] += p * (hi - b)
                out[i, hi] += p * (b - lo)
    return out


def _check_projection(answer, next_probs, rewards, dones, support, gamma, where):
    try:
        got = call_without_mutation(answer, next_probs, rewards, dones, support, gamma)
    except CheckFailed:
        raise
    except NotImplementedError:
        raise
    except Exception as e:
        raise CheckFailed(f"{where}: {type(e).__name__} になりました（{e}）。") from None
    got = expect_tensor(got, "戻り値", shape=next_probs.shape)
    expected = _projection_by_loop(next_probs, rewards, dones, support, gamma)
    mass = got.double().sum(-1)
    if not torch.allclose(mass, torch.ones_like(mass), atol=1e-5):
        i = int((mass - 1).abs().argmax())
        hint = ("目標 Tz がちょうどアトムの上に乗ると b の floor と ceil が等しくなり、(u - b) と (b - l) が"
                "どちらも 0 になって確率が消えます。その場合は全部をそのアトムに置いてください。"
                if mass[i] < 1 else "")
        raise CheckFailed(f"{where}: 射影した分布の和が 1 になりません（行 {i} で {mass[i].item():.6f}）。{hint}")
    if dones.any():
        d = int(torch.nonzero(dones)[0])
        if not torch.allclose(got[d].double(), expected[d], atol=1e-5):
            raise CheckFailed(f"{where}: 終了（dones=True）の行 {d} が違います。"
                              "終了した遷移では次の状態の分布を使わず、確率をすべて報酬 r の位置"
                              "（γz の項なし）に置きます。")
    expect_close(got, expected.to(got.dtype), f"{where}: 射影した分布", atol=1e-5, rtol=1e-4,
                 hint="Tz = r + γz を [v_min, v_max] に切り詰めてから、両隣のアトムに距離に応じて分けます。")


@projection.test("ランダムな分布で、アトムごとのループで計算した射影と一致し、和が 1")
def _(answer, reference):
    g = torch.Generator().manual_seed(0)
    support = torch.linspace(-10, 10, 51)
    probs = torch.randn(8, 51, generator=g).softmax(-1)
    rewards = torch.randn(8, generator=g) * 3
    dones = torch.zeros(8, dtype=torch.bool)
    _check_projection(answer, probs, rewards, dones, support, 0.99 ** 3, "γ = 0.99³")


@projection.test("終了（dones）と、[v_min, v_max] の外に出る目標の切り詰め")
def _(answer, reference):
    g = torch.Generator().manual_seed(1)
    support = torch.linspace(0, 100, 51)
    probs = torch.randn(6, 51, generator=g).softmax(-1)
    rewards = torch.tensor([1.0, 50.0, 150.0, -20.0, 3.0, 0.0])
    dones = torch.tensor([True, False, False, False, True, False])
    _check_projection(answer, probs, rewards, dones, support, 0.97, "終了と切り詰め")


@projection.test("目標がちょうどアトムの上に乗るとき（γ = 1、整数の報酬）も確率が消えない")
def _(answer, reference):
    g = torch.Generator().manual_seed(2)
    support = torch.linspace(-5, 5, 11)
    probs = torch.randn(4, 11, generator=g).softmax(-1)
    rewards = torch.tensor([0.0, 1.0, -2.0, 3.0])
    dones = torch.tensor([False, False, True, False])
    _check_projection(answer, probs, rewards, dones, support, 1.0, "アトムの上に乗る目標")
    _check_projection(answer, probs[:1].double(), rewards[:1].double(), dones[:1], support.double(), 1.0,
                      "バッチ 1・float64")


# =======================================================================================
# noisy_linear

noisy = register("noisy_linear", "因数分解したノイジー線形層（NoisyLinear）", chapter=CHAPTER, reference=NoisyLinear)


def _make(Answer, *args, **kwargs):
    try:
        return Answer(*args, **kwargs)
    except NotImplementedError:
        raise                                             # 未回答として扱う
    except Exception as e:
        raise CheckFailed(f"NoisyLinear(in_features, out_features, std_init) の形で作れませんでした（{e}）。") from None


def _named(layer, name, shape, kind):
    t = getattr(layer, name, None)
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        raise CheckFailed(f"{kind} {name}（形状 {shape}）が見つかりません。名前と形状は固定です。")
    return t


@noisy.test("パラメータ weight_mu・weight_sigma・bias_mu・bias_sigma とバッファ weight_epsilon・bias_epsilon、"
            "Fortunato et al. の初期化（μ は U(-1/√p, 1/√p)、σ は σ₀/√p）")
def _(Answer, reference):
    torch.manual_seed(0)
    layer = _make(Answer, 400, 30, std_init=0.4)
    params = dict(layer.named_parameters())
    buffers = dict(layer.named_buffers())
    shapes = (("weight_mu", (30, 400)), ("weight_sigma", (30, 400)), ("bias_mu", (30,)), ("bias_sigma", (30,)))
    for name, shape in shapes:
        if name not in params:
            raise CheckFailed(f"{name} が nn.Parameter ではありません（学習するパラメータです）。")
        _named(layer, name, shape, "パラメータ")
    for name, shape in (("weight_epsilon", (30, 400)), ("bias_epsilon", (30,))):
        if name not in buffers:
            raise CheckFailed(f"{name} がバッファではありません。register_buffer で登録してください"
                              "（学習しないが state_dict とデバイスの移動には含めたいテンソルです）。")
        _named(layer, name, shape, "バッファ")
    bound = 1 / math.sqrt(400)
    for name in ("weight_mu", "bias_mu"):
        t = params[name].detach()
        if t.abs().max() > bound * (1 + 1e-5) or t.abs().max() < 0.8 * bound:
            raise CheckFailed(f"{name} は U(-1/√p, 1/√p)（p = in_features、ここでは ±{bound:.4f}）で初期化します。"
                              f"最大の絶対値が {t.abs().max().item():.4f} でした。")
    for name in ("weight_sigma", "bias_sigma"):
        t = params[name].detach()
        if not torch.allclose(t, torch.full_like(t, 0.4 / math.sqrt(400))):
            hint = " std_init をそのまま使っていませんか。" if torch.allclose(t, torch.full_like(t, 0.4)) else ""
            raise CheckFailed(f"{name} はすべて σ₀/√p = {0.4 / math.sqrt(400):.4f} で初期化します（因数分解した雑音の"
                              f"初期値。p = in_features。バイアスも同じ）。{hint}")


@noisy.test("reset_noise の雑音は因数分解されている: weight_epsilon = f(ε_out) f(ε_in)ᵀ、bias_epsilon = f(ε_out)、"
            "f(x) = sign(x)·√|x|")
def _(Answer, reference):
    torch.manual_seed(1)
    layer = _make(Answer, 64, 48)
    squares = []
    for _ in range(50):
        layer.reset_noise()
        w, b = layer.weight_epsilon.detach().double(), layer.bias_epsilon.detach().double()
        if torch.linalg.matrix_rank(layer.weight_epsilon.detach().float()).item() != 1:   # float32's tolerance
            raise CheckFailed("weight_epsilon の階数が 1 ではありません。因数分解した雑音では、"
                              "入力側の ε_in（in_features 個）"
                              "と出力側の ε_out（out_features 個）だけを引き、その外積 f(ε_out) f(ε_in)ᵀ を使います。")
        row = w / b[:, None]                                  # each row is f(ε_in) when bias_epsilon = f(ε_out)
        if not torch.allclose(row, row[:1].expand_as(row), rtol=1e-4, atol=1e-6):
            raise CheckFailed("bias_epsilon が weight_epsilon の出力側の因子 f(ε_out) と一致しません。"
                              "バイアスの雑音には、重みと同じ f(ε_out) を使います。")
        squares.append(b.pow(2).mean().item())
    mean_square = sum(squares) / len(squares)
    if abs(mean_square - math.sqrt(2 / math.pi)) > 0.08:      # E[f(x)²] = E|x| = √(2/π) ≈ 0.80 for x ~ N(0, 1)
        raise CheckFailed(f"雑音の 2 乗の平均が {mean_square:.2f} でした。f(x) = sign(x)·√|x| を通すと、"
                          "x ~ N(0, 1) に対して "
                          f"E[f(x)²] = E|x| ≈ 0.80 になります（そのままの正規乱数なら 1.0）。")


@noisy.test("学習モードでは (μ + σ⊙ε) で計算し、評価モード（eval）では μ だけを使う")
def _(Answer, reference):
    torch.manual_seed(2)
    layer = _make(Answer, 10, 7)
    with torch.no_grad():
        layer.weight_sigma.fill_(0.3)
        layer.bias_sigma.fill_(0.2)
    layer.reset_noise()
    x = torch.randn(5, 10)
    layer.train()
    w = layer.weight_mu + layer.weight_sigma * layer.weight_epsilon
    b = layer.bias_mu + layer.bias_sigma * layer.bias_epsilon
    expect_close(layer(x), x @ w.T + b, "学習モードの出力", hint="y = (μ_w + σ_w⊙ε_w) x + μ_b + σ_b⊙ε_b です。")
    layer.eval()
    expect_close(layer(x), x @ layer.weight_mu.T + layer.bias_mu, "評価モードの出力",
                 hint="評価（貪欲な行動の選択）では雑音を使わず、平均の重み μ で計算します。")
    layer.train()
    before = layer(x).detach()
    layer.reset_noise()
    if torch.allclose(layer(x), before):
        raise CheckFailed("reset_noise のあとも出力が変わりません。reset_noise で ε を引き直してください。")
