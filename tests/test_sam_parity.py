"""The chapter 3 reference answers against independent authorities: the SAM step computed by hand
with torch.func, torch.autograd.functional.hessian for the power iteration, the definition of
filter normalisation, and the exact SAM objective on a grid."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad

from solutions import sam


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 5, generator=g), torch.randint(3, (32,), generator=g)


@pytest.mark.parametrize("adaptive", [False, True])
def test_two_sam_steps_match_torch_func_by_hand(adaptive):
    """Two steps, so that the momentum buffer carried between steps is checked too."""
    net, (x, y) = small_net(), batch()
    lr, wd, mom, rho = 0.1, 0.05, 0.9, (0.5 if adaptive else 0.1)

    def loss(params):
        return F.cross_entropy(functional_call(net, params, (x,)), y)

    w = {k: v.detach().clone() for k, v in net.named_parameters()}
    buf = None
    for _ in range(2):
        g = grad(loss)(w)
        t = {k: (w[k].abs() if adaptive else torch.ones_like(w[k])) for k in w}
        norm = torch.sqrt(sum(((t[k] * g[k]) ** 2).sum() for k in w))
        g_eps = grad(loss)({k: w[k] + rho * t[k] ** 2 * g[k] / norm for k in w})
        d = {k: g_eps[k] + wd * w[k] for k in w}
        buf = d if buf is None else {k: mom * buf[k] + d[k] for k in w}
        w = {k: w[k] - lr * buf[k] for k in w}

    opt = sam.SAM(net.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr, momentum=mom, weight_decay=wd)
    for _ in range(2):
        F.cross_entropy(net(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(net(x), y).backward()
        opt.second_step(zero_grad=True)
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), w[k], atol=1e-6, rtol=1e-5)


def test_second_step_restores_bit_for_bit_and_rho_zero_is_the_base_optimizer():
    net, (x, y) = small_net(1), batch(1)
    before = [p.detach().clone() for p in net.parameters()]
    opt = sam.SAM(net.parameters(), torch.optim.SGD, rho=1.3, lr=0.0)
    F.cross_entropy(net(x), y).backward()
    opt.first_step(zero_grad=True)
    assert not all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))
    F.cross_entropy(net(x), y).backward()
    opt.second_step(zero_grad=True)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))

    a, b = small_net(2), small_net(2)
    opt_a = sam.SAM(a.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt_a.step(lambda: (opt_a.zero_grad(), F.cross_entropy(a(x), y).backward()))
        opt_b.zero_grad()
        F.cross_entropy(b(x), y).backward()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_state_dict_keeps_the_base_optimizers_momentum():
    net, (x, y) = small_net(3), batch(3)
    opt = sam.SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt.step(lambda: (opt.zero_grad(), F.cross_entropy(net(x), y).backward()))
    saved = opt.state_dict()
    other = sam.SAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.3, momentum=0.9)
    other.load_state_dict(saved)
    assert other.param_groups is other.base_optimizer.param_groups
    assert other.param_groups[0]["rho"] == 0.1 and other.param_groups[0]["lr"] == 0.1
    buffers = [other.base_optimizer.state[p]["momentum_buffer"] for p in net.parameters()]
    assert all(b.abs().sum() > 0 for b in buffers)


def test_power_iteration_matches_the_full_hessian():
    net, (x, y) = small_net(4), batch(4)
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]

    def f(flat):
        params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        return F.cross_entropy(functional_call(net, params, (x,)), y)

    h = torch.autograd.functional.hessian(f, torch.cat([p.detach().flatten() for p in net.parameters()]))
    eig = torch.linalg.eigvalsh(h)
    top = eig[eig.abs().argmax()].item()
    got = sam.top_hessian_eigenvalue(net, F.cross_entropy, x, y, iters=1000, tol=1e-10,
                                     generator=torch.Generator().manual_seed(0))
    assert math.isclose(got, top, rel_tol=1e-3)
    assert all(p.grad is None for p in net.parameters())


def test_filter_normalised_direction_by_definition():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    d = sam.filter_normalized_direction(model, torch.Generator().manual_seed(0))
    for p, t in zip(model.parameters(), d, strict=True):
        if p.dim() == 1:
            assert torch.count_nonzero(t) == 0
        else:
            torch.testing.assert_close(t.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))


def test_sam_objective_is_the_windowed_maximum():
    w = torch.linspace(-2, 1.5, 351, dtype=torch.float64)
    objective = sam.sam_objective_1d(sam.toy_loss_1d, w, rho=0.3)
    for i in (0, 100, 175, 350):
        window = (w - w[i]).abs() <= 0.3 + 1e-9
        assert math.isclose(objective[i].item(), sam.toy_loss_1d(w[window]).max().item(), abs_tol=1e-12)
    # the two minima of the toy loss are equally deep; SAM's objective prefers the flat one
    sharp, flat = w < -0.5, w > -0.5
    assert abs(sam.toy_loss_1d(w)[sharp].min() - sam.toy_loss_1d(w)[flat].min()) < 0.05
    assert objective[flat].min() < objective[sharp].min() - 0.1


def test_running_stats_are_frozen_only_inside_the_context():
    net = sam.make_mlp(16)
    x = torch.randn(32, 64)
    bn = net[1]
    with sam.running_stats_frozen(net):
        before = bn.running_mean.clone()
        net(x)
        assert torch.equal(bn.running_mean, before)
    net(x)
    assert not torch.equal(bn.running_mean, before) and bn.momentum == 0.1


def test_loss_along_restores_the_parameters_and_starts_at_the_loss_itself():
    data = sam.load_noisy_digits()
    net = sam.make_mlp(32)
    before = [p.detach().clone() for p in net.parameters()]
    d = sam.filter_normalized_direction(net, torch.Generator().manual_seed(0))
    losses = sam.loss_along(net, [d], torch.tensor([[0.0], [0.5]]), data.train_x, data.train_y)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))
    assert math.isclose(losses[0].item(), sam.evaluate(net, data.train_x, data.train_y)["loss"], rel_tol=1e-5)


def test_noisy_labels_flip_about_the_requested_share_and_never_keep_the_true_class():
    data = sam.load_noisy_digits(noise=0.3)
    assert 0.27 < data.flipped.float().mean().item() < 0.33
    assert torch.equal(data.train_y[~data.flipped], data.clean_y[~data.flipped])
    assert sam.load_noisy_digits(noise=0.0).flipped.sum() == 0
