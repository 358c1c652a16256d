"""Chapter 8: the DARTS parts against hand-written definitions.

Every candidate operation keeps the shape (stride 1) or halves it (stride 2); the mixed op equals
the hand-written weighted sum and reduces to one operation under one-hot weights; the cell outputs
multiplier × C channels and the network wires the next cell for them; the architect step moves
the alphas only and the weight step the weights only; the second-order step's finite-difference
Hessian-vector product agrees with autograd's; the genotype on hand-worked alphas (including a row
where 'none' is the largest); the discrete network built from a genotype runs and trains.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from solutions import darts


@pytest.mark.parametrize("name", darts.PRIMITIVES)
@pytest.mark.parametrize("stride", [1, 2])
def test_every_operation_keeps_or_halves_the_shape(name, stride):
    op = darts.OPS[name](6, stride, False)
    x = torch.randn(2, 6, 8, 8)
    assert op(x).shape == (2, 6, 8 // stride, 8 // stride)


def test_mixed_op_is_the_weighted_sum_and_one_hot_selects_one_operation():
    torch.manual_seed(0)
    ops = [darts.OPS[p](4, 1, False) for p in darts.PRIMITIVES]
    mixed = darts.MixedOp(ops)
    x = torch.randn(3, 4, 8, 8)
    w = F.softmax(torch.randn(len(ops)), 0)
    expected = sum(w[k] * ops[k](x) for k in range(len(ops)))
    torch.testing.assert_close(mixed(x, w), expected)
    for k in range(len(ops)):
        torch.testing.assert_close(mixed(x, F.one_hot(torch.tensor(k), len(ops)).float()), ops[k](x))


def test_cells_chain_their_channels_and_reductions():
    net = darts.SearchNetwork(c=4, layers=5, steps=3, multiplier=3, reductions=[1, 3])
    out = net(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10)
    cells = list(net.cells)
    assert [c.reduction for c in cells] == [False, True, False, True, False]
    # the cell after a reduction cell reduces its input from two cells back (FactorizedReduce), no other does
    assert [type(c.preprocess0).__name__ for c in cells] == ["ReLUConvBN", "ReLUConvBN", "FactorizedReduce",
                                                             "ReLUConvBN", "FactorizedReduce"]


def test_weights_and_arch_parameters_are_disjoint_and_complete():
    net = darts.SearchNetwork(c=4)
    weights, arch = net.weights(), net.arch_parameters()
    assert {id(p) for p in weights}.isdisjoint({id(p) for p in arch})
    assert len(weights) + len(arch) == len(list(net.parameters()))
    assert arch[0].shape == (darts.edges_per_cell(4), len(darts.PRIMITIVES))


def _small_setup(seed=0):
    torch.manual_seed(seed)
    net = darts.SearchNetwork(c=4, steps=2)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=0.01, betas=(0.5, 0.999))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    return net, a_opt, x, y


def test_architect_step_changes_alphas_only():
    net, a_opt, x, y = _small_setup()
    weights = [p.detach().clone() for p in net.weights()]
    alphas = [p.detach().clone() for p in net.arch_parameters()]
    darts.architect_step(net, a_opt, x, y)
    assert all(torch.equal(a, b) for a, b in zip(weights, net.weights(), strict=True))
    assert all(p.grad is None for p in net.weights())
    assert all(not torch.equal(a, b) for a, b in zip(alphas, net.arch_parameters(), strict=True))


def test_weight_step_changes_weights_only():
    net, _, x, y = _small_setup()
    w_opt = torch.optim.SGD(net.weights(), lr=0.1)
    alphas = [p.detach().clone() for p in net.arch_parameters()]
    w_opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    w_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(alphas, net.arch_parameters(), strict=True))


def test_second_order_hessian_vector_product_matches_autograd():
    """The finite difference (∇_α L(w⁺) − ∇_α L(w⁻)) / 2ε against the exact mixed second derivative."""
    net, _, x, y = _small_setup(1)
    net.eval().double()                              # running BatchNorm statistics (a fixed function), float64
    x = x.double()
    weights, alphas = net.weights(), net.arch_parameters()
    v = [torch.randn_like(w) for w in weights]
    loss = F.cross_entropy(net(x), y)
    grad_w = torch.autograd.grad(loss, weights, create_graph=True)
    exact = torch.autograd.grad(sum((g * vi).sum() for g, vi in zip(grad_w, v, strict=True)), alphas)
    backup = [w.detach().clone() for w in weights]
    eps = 1e-7                                       # ReLU and max-pool kinks: keep the step tiny (float64)
    grads = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for w, b, vi in zip(weights, backup, v, strict=True):
                w.copy_(b + sign * eps * vi)
        grads.append(torch.autograd.grad(F.cross_entropy(net(x), y), alphas))
    approx = [(gp - gm) / (2 * eps) for gp, gm in zip(*grads, strict=True)]
    for a, e in zip(approx, exact, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-3)


def test_second_order_step_gives_the_unrolled_gradient_as_epsilon_shrinks():
    """architect_step_second_order's alpha gradient against autograd through one unrolled weight step:
    d/dα L_val(w − ξ ∇_w L_train(w, α), α), in float64 with running BatchNorm statistics (a fixed function)."""
    from torch.func import functional_call

    net, _, x, y = _small_setup(3)
    net.eval().double()
    x_tr, y_tr, x_val, y_val = x.double(), y, x.double().flip(0) * 0.7, y.flip(0)
    xi = 0.3
    names = [n for n, p in net.named_parameters() if "alphas" not in n]
    alphas = {n: p for n, p in net.named_parameters() if "alphas" in n}
    weights = {n: p.detach().clone().requires_grad_(False) for n, p in net.named_parameters() if n in names}
    arch = {n: a.detach().clone().requires_grad_(True) for n, a in alphas.items()}
    w = {n: t.clone().requires_grad_(True) for n, t in weights.items()}
    g_train = torch.autograd.grad(F.cross_entropy(functional_call(net, {**w, **arch}, (x_tr,)), y_tr),
                                  list(w.values()), create_graph=True)
    unrolled = {n: w[n] - xi * g for n, g in zip(w, g_train, strict=True)}
    val_loss = F.cross_entropy(functional_call(net, {**unrolled, **arch}, (x_val,)), y_val)
    exact = torch.autograd.grad(val_loss, list(arch.values()))
    opt = torch.optim.SGD(net.arch_parameters(), lr=0.0)          # lr 0: the step leaves α, .grad is read
    darts.architect_step_second_order(net, opt, x_tr, y_tr, x_val, y_val, xi=xi, eps_scale=1e-7)
    for a, e in zip(net.arch_parameters(), exact, strict=True):
        torch.testing.assert_close(a.grad, e, atol=1e-6, rtol=1e-4)
    first_order = torch.autograd.grad(F.cross_entropy(net(x_val), y_val), net.arch_parameters())
    assert any((f - e).abs().max() > 1e-4 for f, e in zip(first_order, exact, strict=True))   # xi matters here


def test_second_order_step_changes_alphas_only_and_restores_weights():
    net, a_opt, x, y = _small_setup(2)
    weights = [p.detach().clone() for p in net.weights()]
    darts.architect_step_second_order(net, a_opt, x, y, x.flip(0), y.flip(0), xi=0.05)
    assert all(torch.equal(a, b) for a, b in zip(weights, net.weights(), strict=True))


def test_derive_genotype_on_hand_worked_alphas():
    prims = ["none", "skip_connect", "sep_conv_3x3"]
    big, small = 3.0, 0.0
    alphas = torch.tensor([
        # node 0: edges from inputs 0, 1
        [small, big, small],        # edge 0: skip strongest
        [big + 2, small, big - 1],  # edge 1: 'none' largest, then sep_conv (weight of sep_conv < skip on edge 0)
        # node 1: edges from inputs 0, 1, 2
        [small, small, 1.0],        # edge 0: weak sep_conv
        [small, 2.0, small],        # edge 1: skip
        [small, small, 2.5],        # edge 2: sep_conv, strongest of node 1
    ])
    gene = darts.derive_genotype(alphas, prims, steps=2, k=2)
    p = F.softmax(alphas.double(), -1)
    assert p[1, 2] < p[0, 1]                         # the hand-worked order inside node 0
    assert gene == [("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2), ("skip_connect", 1)]


def test_random_genotype_and_discrete_network_run_and_train():
    rng = np.random.default_rng(0)
    geno = darts.random_genotype(rng)
    assert all(name != "none" for name, _ in geno.normal + geno.reduce)
    for i in range(4):
        inputs = [j for _, j in geno.normal[2 * i:2 * i + 2]]
        assert len(set(inputs)) == 2 and all(0 <= j < 2 + i for j in inputs)
    torch.manual_seed(0)
    net = darts.DiscreteNetwork(geno, c=4)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_search_with_warmup_trains_weights_but_not_alphas():
    torch.set_num_threads(1)
    data = darts.digits_splits(0, n_val=64, n_test=64)
    small = tuple((x[:128], y[:128]) for x, y in data)
    out = darts.search(darts.SearchConfig(c=4, steps=2, epochs=1, batch_size=64, warmup_epochs=1), data=small)
    torch.manual_seed(0)                               # the search's own seed: the alphas it started from
    fresh = darts.SearchNetwork(4, 10, 3, 2)
    for a, b in zip(out["model"].arch_parameters(), fresh.arch_parameters(), strict=True):
        assert torch.equal(a, b)
    assert len(out["history"]["val_acc"]) == 1 and out["history"]["entropy_normal"][0].shape == (5,)


def test_shifted_digits_paste_each_digit_once_into_the_canvas():
    (x_tr, y_tr), (x_val, _), (x_te, _) = darts.shifted_digits_splits(0, size=16, noise=0.0, n_train=50)
    assert x_tr.shape == (50, 1, 16, 16) and len(y_tr) == 50 and x_val.shape[2:] == x_te.shape[2:] == (16, 16)
    (plain, _), _, _ = darts.digits_splits(0, n_val=200, n_test=400)
    for i in range(5):                                 # without noise the canvas holds the digit and zeros elsewhere
        canvas, digit = x_tr[i, 0], plain[i, 0]
        hits = [(r, c) for r in range(9) for c in range(9)
                if torch.equal(canvas[r:r + 8, c:c + 8], digit)
                and torch.count_nonzero(canvas).item() == torch.count_nonzero(digit).item()]
        assert hits
    again = darts.shifted_digits_splits(0, n_train=50)[0][0]
    assert torch.equal(again, darts.shifted_digits_splits(0, n_train=50)[0][0])


def test_cell_plan_is_what_both_networks_build():
    plan, c_out = darts.cell_plan(4, 5, {1, 3}, multiplier=3)
    assert [p[2] for p in plan] == [4, 8, 8, 16, 16]                        # C doubles at each reduction
    assert [(p[3], p[4]) for p in plan] == [(False, False), (True, False), (False, True), (True, False),
                                            (False, True)]
    assert [p[1] for p in plan] == [12, 12, 24, 24, 48] and c_out == 48      # c_prev: 3 × the previous C
    search = darts.SearchNetwork(c=4, layers=5, steps=3, multiplier=3, reductions=[1, 3])
    genotype = darts.random_genotype(np.random.default_rng(1), steps=3)
    discrete = darts.DiscreteNetwork(genotype, c=4, layers=5, reductions=[1, 3])
    for net in (search, discrete):
        assert net.classifier.in_features == c_out
        for cell, (_, c_p, c, reduction, reduction_prev) in zip(net.cells, plan, strict=True):
            assert cell.reduction == reduction
            assert isinstance(cell.preprocess0, darts.FactorizedReduce) == reduction_prev
            assert cell.preprocess1[1].in_channels == c_p and cell.preprocess1[1].out_channels == c


def test_search_ops_normalise_every_candidate_and_keep_the_shape():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8, 8) * 5 + 3
    for name in darts.PRIMITIVES:
        for stride in (1, 2):
            op = darts.search_op(name, 6, stride)
            y = op(x)
            assert y.shape == (4, 6, 8 // stride, 8 // stride)
            if "pool" in name or "conv" in name:                      # ends with a BatchNorm in training mode
                assert y.mean().abs() < 1e-4 and (y.var(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-2


def test_genotype_text_round_trip_and_parameter_free_count():
    genotype = darts.random_genotype(np.random.default_rng(3))
    assert darts.genotype_from_text(darts.genotype_to_text(genotype)) == genotype
    assert darts.parameter_free_count([("skip_connect", 0), ("sep_conv_3x3", 1), ("max_pool_3x3", 2),
                                       ("avg_pool_3x3", 0), ("dil_conv_5x5", 1)]) == 3
    uniform = torch.zeros(14, len(darts.PRIMITIVES))
    assert darts.parameter_free_share(uniform) == pytest.approx(3 / 8)


def test_stored_reference_experiment_is_complete():
    search_rows, retrain_rows = darts.read_reference_experiment()
    ref = darts.REFERENCE
    for variant in ref["variants"]:
        for seed in ref["search_seeds"]:
            rows = [r for r in search_rows if r["variant"] == variant and r["seed"] == seed]
            epochs = darts.reference_search_config(variant, seed).epochs
            assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    architectures = {r["architecture"] for r in retrain_rows}
    assert len(architectures) == len(ref["variants"]) * len(ref["search_seeds"]) + ref["random_architectures"]
    for arch in architectures:
        assert sorted(r["train_seed"] for r in retrain_rows if r["architecture"] == arch) == list(ref["train_seeds"])
    for row in search_rows:                                   # the stored counts are those of the stored genotype
        genotype = darts.genotype_from_text(row["genotype"])
        assert darts.parameter_free_count(genotype.normal) == row["parameter_free_normal"]
        assert darts.parameter_free_count(genotype.reduce, reduction=True) == row["parameter_free_reduce"]
    finals = {(r["variant"], r["seed"]): r["genotype"] for r in search_rows
              if r["epoch"] == darts.reference_search_config(r["variant"], r["seed"]).epochs}
    assert len(finals) == len(ref["variants"]) * len(ref["search_seeds"])
    for (variant, seed), text in finals.items():               # the retrained cell is the search's last one
        assert {r["genotype"] for r in retrain_rows if r["architecture"] == f"{variant}_seed{seed}"} == {text}
    for name, genotype in darts.random_architectures():           # the random ones are the documented draws
        assert {r["genotype"] for r in retrain_rows if r["architecture"] == name} == {darts.genotype_to_text(genotype)}


def test_draw_genotype_draws_every_edge():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    genotype = darts.random_genotype(np.random.default_rng(0))
    fig, ax = plt.subplots()
    darts.draw_genotype(ax, genotype.normal, 4, "normal")
    assert len(ax.patches) == len(genotype.normal) + 4            # 8 edges and 4 dashed arrows to the output
    plt.close(fig)


@pytest.mark.parametrize("reduction", [False, True])
def test_has_parameters_agrees_with_the_operation_built_on_that_edge(reduction):
    for name in darts.PRIMITIVES:
        for j in range(5):
            stride = 2 if reduction and j < 2 else 1
            op = darts.OPS[name](8, stride, True)
            assert darts.has_parameters(name, j, reduction) == (darts.count_parameters(op) > 0), (name, j)
