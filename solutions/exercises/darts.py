"""Chapter 8's exercises: their registrations and the tests that grade a reader's answer.

The mixed operation is compared with the weighted sum written out here, on real candidate
operations (stride 1 and stride 2, batch 1, odd sizes), with one-hot and uneven weights, and by
its gradient with respect to the weights. The genotype is compared with a hand-worked example
(a row where 'none' is the largest, rows where softmax changes the ranking of edges) and with the
reference on random alphas, also with 'none' in another column. The architect step is compared
with the same step taken on an identical copy of the network (SGD and Adam on the alphas), and
the weights must not move.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checker import CheckFailed, call_answer, expect_close, expect_tensor, register
from ..darts import OPS, PRIMITIVES, MixedOp, SearchNetwork, architect_step, derive_genotype

CHAPTER = "08_darts"


# =======================================================================================
# mixed_op

mixed = register("mixed_op", "混合演算 MixedOp", chapter=CHAPTER, reference=MixedOp)

_SUM_HINT = ("forward(x, weights) は Σ_k weights[k] · ops[k](x) です。weights はすでに softmax を通した 1 次元の"
             "テンソル（長さは候補の数）なので、もう一度 softmax を通したり、最大のものだけを選んだりせず、"
             "k 番目の演算の出力に weights[k] を掛けて全部足します。")


def _candidates(c, stride, seed):
    torch.manual_seed(seed)
    ops = [OPS[p](c, stride, False) for p in PRIMITIVES]
    for op in ops:                      # parameters away from their initial values, so that each op differs
        for p in op.parameters():
            p.data.add_(0.3 * torch.randn_like(p))
    return ops


def _build(answer, ops):
    try:
        module = answer(ops)
    except NotImplementedError:
        raise
    except Exception as e:
        raise CheckFailed(f"MixedOp(ops) を作ると {type(e).__name__} になりました（{e}）。") from None
    if not isinstance(module, nn.Module):
        raise CheckFailed("MixedOp は nn.Module を継承したクラスにしてください。")
    held = getattr(module, "ops", None)
    if not isinstance(held, nn.ModuleList):
        raise CheckFailed("候補の演算は nn.ModuleList に入れて self.ops に持たせてください（Python のリストでは"
                          "パラメータが登録されず、最適化手法にも state_dict にも入りません）。")
    if len(held) != len(ops) or any(a is not b for a, b in zip(held, ops, strict=False)):
        raise CheckFailed("self.ops には渡された演算を同じ順番でそのまま入れてください（順番が weights の列と"
                          "対応します）。")
    n_expected = sum(p.numel() for op in ops for p in op.parameters())
    if sum(p.numel() for p in module.parameters()) != n_expected:
        raise CheckFailed(f"MixedOp のパラメータの数が候補の演算の合計（{n_expected}）と違います。")
    return module


def _weighted_sum(ops, x, weights):
    total = 0
    for w, op in zip(weights, ops, strict=True):
        total = total + w * op(x)
    return total


@mixed.test("実際の候補の演算（stride 1 と 2、8 種類）で、偏った weights と one-hot の weights の出力")
def _(answer, reference):
    for stride, shape in ((1, (3, 4, 7, 7)), (2, (2, 4, 8, 8)), (1, (1, 4, 5, 5))):
        ops = _candidates(4, stride, seed=stride)
        module = _build(answer, ops)
        x = torch.randn(*shape)
        weights = F.softmax(torch.linspace(-1.5, 2.0, len(ops)) * torch.tensor([1, -1, 1, -1, 1, -1, 1, -1]), 0)
        expected = _weighted_sum(ops, x, weights)
        got = expect_tensor(call_answer(module, x, weights), f"stride {stride} の出力", shape=expected.shape)
        if torch.allclose(got, _weighted_sum(ops, x, torch.ones(len(ops))), atol=1e-5):
            raise CheckFailed("出力が重みなしの和 Σ_k ops[k](x) になっています。weights[k] を掛けてください。 "
                              + _SUM_HINT)
        if torch.allclose(got, _weighted_sum(ops, x, F.softmax(weights, 0)), atol=1e-5):
            raise CheckFailed("weights にもう一度 softmax を通しています。 " + _SUM_HINT)
        expect_close(got, expected, f"stride {stride}、入力 {shape} の出力", atol=1e-5, rtol=1e-4, hint=_SUM_HINT)
        for k in (3, 4, 7):
            one_hot = torch.zeros(len(ops))
            one_hot[k] = 1.0
            expect_close(call_answer(module, x, one_hot), ops[k](x),
                         f"weights が {PRIMITIVES[k]} だけ 1 の one-hot のときの出力", atol=1e-5, rtol=1e-4,
                         hint="one-hot の weights なら、その演算 1 つの出力と同じになるはずです。 " + _SUM_HINT)


@mixed.test("weights についての勾配（∂ 出力の和 / ∂ weights[k] = ops[k](x) の和）が流れる")
def _(answer, reference):
    ops = _candidates(4, 1, seed=5)
    module = _build(answer, ops)
    x = torch.randn(2, 4, 6, 6)
    alphas = torch.randn(len(ops), requires_grad=True)
    weights = F.softmax(alphas, 0)
    out = expect_tensor(call_answer(module, x, weights), "出力")
    (grad,) = torch.autograd.grad(out.sum(), weights, allow_unused=True) if out.requires_grad else (None,)
    if grad is None:
        raise CheckFailed("出力から weights（つまり α）へ勾配が流れません。weights を detach したり、.item() で数に"
                          "したり、argmax で 1 つを選んだりしていないか確認してください。DARTS は α をこの勾配で"
                          "学習します。")
    with torch.no_grad():
        expected = torch.stack([op(x).sum() for op in ops])
    expect_close(grad, expected, "∂(出力の和)/∂weights", atol=1e-3, rtol=1e-4, hint=_SUM_HINT)


# =======================================================================================
# derive_genotype

genotype = register("derive_genotype", "α から遺伝子型（genotype）を導く", chapter=CHAPTER,
                    reference=derive_genotype)

_GENE_HINT = ("ノード i（0 から数えて）には 2 + i 本の入力の辺があり、alphas の行がその順に並んでいます。各行に"
              "softmax を通し、'none' を除いた中で最も重みの大きい演算をその辺の代表とし、代表の重みが大きい順に"
              "ノードごとに k 本の辺を残します（セル全体からではありません）。並びはノードの順、ノードの中では"
              "強い辺が先です。")

# A hand-worked case: steps = 2 (2 + 3 = 5 rows), primitives in PRIMITIVES order, k = 2.
#   node 0 (rows 0, 1):    row 0's strongest non-none op is sep_conv_3x3, row 1's is max_pool_3x3;
#                          row 0 has 'none' as its largest entry but still has the weaker representative.
#   node 1 (rows 2, 3, 4 = inputs 0, 1, 2, input 2 being node 0): row 2 has the largest 'none' of all;
#                          ranking by the largest entry of each row
#                          (none included) would keep row 2, which is wrong.
# Rows 3 and 4: raw alphas rank row 4 first (its largest alpha is larger) but after softmax row 3 is
# stronger, because row 4's mass is spread over two large entries.
_HAND_ALPHAS = torch.tensor([
    # none  max   avg   skip  sep3  sep5  dil3  dil5
    [3.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
    [0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [5.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.5, 0.0],
    [0.0, 0.0, 0.0, 2.8, 2.7, 0.0, 0.0, 0.0],
])
# The strongest non-none softmax weight of each row (rounded): row 0: sep_conv_3x3 0.094; row 1: max_pool_3x3
# 0.513; row 2: skip_connect 0.011 (its 'none' is 0.951); row 3: dil_conv_3x3 0.635; row 4: skip_connect 0.441.
_HAND_EXPECTED_K2 = [("max_pool_3x3", 1), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1), ("skip_connect", 2)]


def _gene(answer, alphas, primitives, steps, k):
    out = call_answer(answer, alphas, list(primitives), steps, k)
    if not isinstance(out, (list, tuple)):
        raise CheckFailed(f"戻り値は (演算の名前, 入力の番号) のリストのはずですが、{type(out).__name__} でした。")
    gene = []
    for item in out:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise CheckFailed(f"リストの要素は (演算の名前, 入力の番号) の組のはずですが、{item!r} がありました。")
        name, j = item
        try:
            index = int(j)
        except (TypeError, ValueError):
            raise CheckFailed(f"入力の番号は整数のはずですが、{j!r} がありました。") from None
        if index != j:
            raise CheckFailed(f"入力の番号は整数のはずですが、{j!r} がありました。")
        gene.append((str(name), index))
    if len(gene) != steps * k:
        raise CheckFailed(f"steps = {steps}、k = {k} なら {steps * k} 組（ノードごとに k 本）のはずですが、"
                          f"{len(gene)} 組でした。 " + _GENE_HINT)
    return gene


def _explain(gene, expected, alphas, primitives, steps, k):
    """Name the likely mistake from the answer's effect on the output."""
    if any(name == "none" for name, _ in gene):
        return ("'none' が選ばれています。'none' は「辺がない」ことを表すので、演算の候補からも辺の順位付けからも"
                "除きます。")
    alt = _variants(alphas, primitives, steps, k)
    for key, message in (
        ("ranked_with_none", ("辺の順位を、'none' も含めた行の最大の重みで決めています。'none' の重みが大きい辺ほど"
                              "「ない」ほうに寄っているので、順位は 'none' を除いた最大の重みで決めます。")),
        ("over_cell", ("残す辺をセル全体の上位 steps × k 本から選んでいます。各ノードが k 本ずつ入力を持つように、"
                       "ノードごとに上位 k 本を選びます。")),
        ("softmax_dim0", ("softmax を辺の向き（dim = 0、列ごと）に通しています。各辺の演算の上の分布にするので、"
                          "行ごと（dim = −1）に通します。")),
        ("no_softmax", ("softmax を通さずに α の大きさで辺を比べています。行ごとの softmax の後の重みで比べます"
                        "（同じ最大値でも、ほかの演算に重みが分かれている辺は弱くなります）。")),
        ("by_index", "ノードの中の並びが入力の番号順になっています。強い辺（代表の重みが大きい辺）を先にします。"),
    ):
        if gene == alt[key]:
            return message
    return _GENE_HINT


def _variants(alphas, primitives, steps, k):
    """What the usual mistakes return on these alphas (to name the mistake in the verdict)."""
    none = list(primitives).index("none")
    out = {}
    for key in ("ranked_with_none", "over_cell", "softmax_dim0", "no_softmax", "by_index"):
        a = alphas.detach().double()
        w = a if key == "no_softmax" else F.softmax(a, dim=0 if key == "softmax_dim0" else -1)
        cands, start = [], 0
        for i in range(steps):
            for j in range(2 + i):
                row = w[start + j].clone()
                rank = row.max().item() if key == "ranked_with_none" else None
                row[none] = -float("inf")
                best = int(row.argmax())
                cands.append((i, j, primitives[best], rank if rank is not None else row[best].item()))
            start += 2 + i
        if key == "over_cell":
            kept = sorted(cands, key=lambda c: -c[3])[:steps * k]
            out[key] = [(name, j) for i in range(steps)
                        for (_, j, name, _) in sorted([c for c in kept if c[0] == i], key=lambda c: -c[3])]
            continue
        gene = []
        for i in range(steps):
            node = sorted([c for c in cands if c[0] == i], key=lambda c: -c[3])[:k]
            if key == "by_index":
                node = sorted(node, key=lambda c: c[1])
            gene.extend((name, j) for (_, j, name, _) in node)
        out[key] = gene
    return out


def _compare(answer, reference, alphas, primitives, steps, k, where):
    got = _gene(answer, alphas, primitives, steps, k)
    expected = reference(alphas, primitives, steps, k)
    if got != expected:
        raise CheckFailed(f"{where}: {expected} のはずが {got} でした。 "
                          + _explain(got, expected, alphas, primitives, steps, k))


@genotype.test("手で計算した例（'none' が最大の行、softmax で辺の順位が入れ替わる行を含む、steps = 2、k = 2 と k = 1）")
def _(answer, reference):
    got = _gene(answer, _HAND_ALPHAS.clone(), PRIMITIVES, 2, 2)
    if got != _HAND_EXPECTED_K2:
        raise CheckFailed(f"手で計算した例: {_HAND_EXPECTED_K2} のはずが {got} でした。 "
                          + _explain(got, _HAND_EXPECTED_K2, _HAND_ALPHAS, PRIMITIVES, 2, 2))
    _compare(answer, reference, _HAND_ALPHAS.clone(), PRIMITIVES, 2, 1, "手で計算した例（k = 1）")


@genotype.test("ランダムな α（steps = 4 と 3、k = 2）、α が nn.Parameter、'none' が別の列にある候補の並び")
def _(answer, reference):
    g = torch.Generator().manual_seed(0)
    for steps, scale in ((4, 1.0), (3, 2.0), (4, 0.3)):
        n = sum(2 + i for i in range(steps))
        alphas = nn.Parameter(torch.randn(n, len(PRIMITIVES), generator=g) * scale)
        _compare(answer, reference, alphas, PRIMITIVES, steps, 2, f"steps = {steps} のランダムな α")
    shuffled = ["sep_conv_3x3", "skip_connect", "none", "max_pool_3x3", "dil_conv_3x3"]
    alphas = torch.randn(9, len(shuffled), generator=g)
    alphas[:, 2] += 1.0                          # 'none' often the largest, in column 2 this time
    _compare(answer, reference, alphas, shuffled, 3, 2, "'none' が 3 列目にある候補の並び")


# =======================================================================================
# architect_step

architect = register("architect_step", "アーキテクチャ・パラメータ α の一次近似の更新", chapter=CHAPTER,
                     reference=architect_step)

_ARCH_HINT = ("一次近似の DARTS では、検証バッチの損失 L_val(w, α) の α についての勾配を今の重み w のまま求め、"
              "α 用の最適化手法で 1 ステップ進めます。α 用の最適化手法の zero_grad() を先に呼び、重み w は動かしません"
              "（重みの最適化手法を呼ばない、重みを書き換えない）。モデルは学習モードのまま（BatchNorm はバッチの"
              "統計）で損失を求めます。")


def _twin_networks(seed):
    torch.manual_seed(seed)
    ours = SearchNetwork(c=4, num_classes=5, layers=2, steps=2, reductions=[1])
    with torch.no_grad():
        for a in ours.arch_parameters():
            a.normal_(0.0, 0.5)                  # alphas away from uniform, so that the gradient is not tiny
    return ours, copy.deepcopy(ours)


def _optimizer(kind, alphas):
    if kind == "SGD":
        return torch.optim.SGD(alphas, lr=0.5)
    return torch.optim.Adam(alphas, lr=0.05, betas=(0.5, 0.999), weight_decay=1e-3)


@architect.test("同じネットワークの複製で取った模範解答の 1 ステップと同じ α になり、重みは 1 つも動かない"
                "（SGD と Adam、続けて 2 回）")
def _(answer, reference):
    g = torch.Generator().manual_seed(1)
    x_val, y_val = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)
    for kind in ("SGD", "Adam"):
        theirs, ours = _twin_networks(2)
        their_opt, our_opt = _optimizer(kind, theirs.arch_parameters()), _optimizer(kind, ours.arch_parameters())
        weights_before = [w.detach().clone() for w in theirs.weights()]
        for step in (1, 2):
            alphas_before = [a.detach().clone() for a in theirs.arch_parameters()]
            call_answer(answer, theirs, their_opt, x_val, y_val)
            if not theirs.training:
                raise CheckFailed("呼んだ後にモデルが評価モード（eval）のままです。探索中は学習モードのまま α も"
                                  "更新します（評価モードに切り替えたなら、戻してください）。")
            reference(ours, our_opt, x_val, y_val)
            moved = [name for (name, w), b in zip(((n, p) for n, p in theirs.named_parameters() if "alphas" not in n),
                                                  weights_before, strict=True) if not torch.equal(w.detach(), b)]
            if moved:
                raise CheckFailed(f"{kind}、{step} 回目: 重み（たとえば {moved[0]}）が変わりました。アーキテクチャの"
                                  "更新では α だけを動かします。 " + _ARCH_HINT)
            if all(torch.equal(a.detach(), b) for a, b in zip(theirs.arch_parameters(), alphas_before, strict=True)):
                raise CheckFailed(f"{kind}、{step} 回目: α が変わりませんでした。α 用の最適化手法の step() を"
                                  "呼んでいますか。 " + _ARCH_HINT)
            for name, a, b, before in zip(("alphas_normal", "alphas_reduce"), theirs.arch_parameters(),
                                          ours.arch_parameters(), alphas_before, strict=True):
                expected_move, got_move = b.detach() - before, a.detach() - before
                if kind == "SGD" and torch.allclose(got_move, -expected_move, atol=1e-6, rtol=1e-3):
                    raise CheckFailed(f"{name} が逆向きに動きました（検証損失を大きくする向き）。損失を最小化する"
                                      "ので、損失そのものの勾配で step() します。")
                hint = _ARCH_HINT
                if step == 2:
                    hint = ("1 回目は合っていて 2 回目が違います。α 用の最適化手法の zero_grad() を呼ばずに勾配が"
                            "たまっていませんか。 " + _ARCH_HINT)
                expect_close(a.detach(), b.detach(), f"{kind}、{step} 回目の更新の後の {name}", atol=1e-6, rtol=1e-5,
                             hint=hint)


@architect.test("勾配は学習モード（BatchNorm はバッチの統計）で今の重みのまま求め、モデルのモードを変えない")
def _(answer, reference):
    g = torch.Generator().manual_seed(3)
    x_val, y_val = torch.randn(1, 1, 7, 7, generator=g) * 3, torch.randint(0, 5, (1,), generator=g)
    x_val = torch.cat([x_val, torch.randn(3, 1, 7, 7, generator=g)])
    y_val = torch.cat([y_val, torch.randint(0, 5, (3,), generator=g)])
    theirs, ours = _twin_networks(4)
    their_opt, our_opt = _optimizer("SGD", theirs.arch_parameters()), _optimizer("SGD", ours.arch_parameters())
    call_answer(answer, theirs, their_opt, x_val, y_val)
    if not theirs.training:
        raise CheckFailed("呼んだ後にモデルが評価モード（eval）のままです。探索中は学習モードのまま α も更新します。")
    reference(ours, our_opt, x_val, y_val)
    for name, a, b in zip(("alphas_normal", "alphas_reduce"), theirs.arch_parameters(), ours.arch_parameters(),
                          strict=True):
        expect_close(a.detach(), b.detach(), f"奇数の大きさ（7×7）の入力で更新した後の {name}", atol=1e-6, rtol=1e-5,
                     hint="評価モードに切り替えて勾配を求めていませんか（BatchNorm が移動平均の統計を使うので値が"
                          "変わります）。 " + _ARCH_HINT)
