"""Chapter 3's answer cases for the checker (used by tests/test_exercises.py).

``CORRECT``: answers written differently from the reference that must pass.
``WRONG``: the mistakes readers actually make (several from the seed listing), each with a
phrase the verdict must contain (or "" when any failure will do).
"""

import torch

from solutions import sam

# --------------------------------------------------------------------------- SAM


class SAMForeach(torch.optim.Optimizer):  # the perturbation kept in its own list; step never needs a prior backward
    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        super().__init__(params, {"rho": rho, "adaptive": adaptive, **kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        pairs = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        scaled = [(p.abs() * p.grad if g["adaptive"] else p.grad) for g, p in pairs]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        for (g, p) in pairs:
            e = p.grad * (p * p if g["adaptive"] else 1.0) * (g["rho"] / (total + 1e-12))
            self.state[p]["w"] = p.clone()
            p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for p, st in self.state.items():
            if "w" in st:
                p.copy_(st.pop("w"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):
        with torch.enable_grad():
            closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()


class SAMRestoreBySubtraction(sam.SAM):  # p - ε is not bit-for-bit w
    @torch.no_grad()
    def first_step(self, zero_grad=False):
        super().first_step(zero_grad=False)
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    self.state[p]["e"] = p - self.state[p].pop("old_p")
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if "e" in self.state[p]:
                    p.sub_(self.state[p].pop("e"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


class SAMNormPerTensor(sam.SAM):
    @torch.no_grad()
    def first_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.clone()
                p.add_(group["rho"] * p.grad / (p.grad.norm() + 1e-12))
        if zero_grad:
            self.zero_grad()


class SAMBaseStepAtPerturbed(sam.SAM):  # the base step computed at w + ε, its change then applied to w
    @torch.no_grad()
    def second_step(self, zero_grad=False):
        before = {p: p.clone() for g in self.param_groups for p in g["params"]}
        self.base_optimizer.step()
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.copy_(self.state[p].pop("old_p") + (p - before[p]))
        if zero_grad:
            self.zero_grad()


class SAMNeverRestores(sam.SAM):
    @torch.no_grad()
    def second_step(self, zero_grad=False):
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


class SAMDescends(sam.SAM):
    @torch.no_grad()
    def first_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.neg_()
        super().first_step(zero_grad)


class SAMFixedRho(sam.SAM):  # ignores the rho it was given
    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        super().__init__(params, base_optimizer, rho=0.05, adaptive=adaptive, **kwargs)


class SAMSeedRestore(sam.SAM):  # the seed: restores only parameters that have a gradient now
    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


class SAMOwnGroups(sam.SAM):  # the base optimizer gets its own copy of the groups
    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        torch.optim.Optimizer.__init__(self, params, {"rho": rho, "adaptive": adaptive, **kwargs})
        self.base_optimizer = base_optimizer([p for g in self.param_groups for p in g["params"]], **kwargs)


class SAMAdaptiveAbs(sam.SAM):  # ASAM with |w| instead of w² in the numerator
    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.clone()
                p.add_((p.abs() if group["adaptive"] else 1.0) * p.grad * group["rho"] / (grad_norm + 1e-12))
        if zero_grad:
            self.zero_grad()


# --------------------------------------------------------------------------- sharpness


def hessian_by_torch_func(model, loss_fn, x, y, iters=50, tol=1e-4, generator=None):  # autograd.functional.hvp
    names = [k for k, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def loss(*ps):
        return loss_fn(torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,)), y)

    v = tuple(torch.randn(p.shape, generator=generator) for p in params)
    value = 0.0
    for _ in range(iters):
        norm = torch.sqrt(sum((t * t).sum() for t in v))
        v = tuple(t / norm for t in v)
        _, hv = torch.autograd.functional.hvp(loss, params, v)
        value = sum((h * t).sum() for h, t in zip(hv, v, strict=True)).item()
        v = hv
    return value


def hessian_gradient_norm(model, loss_fn, x, y, iters=50, tol=1e-4, generator=None):
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), params)
    return torch.sqrt(sum((g * g).sum() for g in grads)).item()


def hessian_backward_create_graph(model, loss_fn, x, y, iters=50, tol=1e-4, generator=None):
    params = list(model.parameters())
    loss_fn(model(x), y).backward(create_graph=True)  # leaves .grad behind
    grads = [p.grad for p in params]
    v = [torch.randn(p.shape, generator=generator) for p in params]
    value = 0.0
    for _ in range(iters):
        norm = torch.sqrt(sum((u * u).sum() for u in v))
        v = [u / norm for u in v]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        value = sum((h * u).sum() for h, u in zip(hv, v, strict=True)).item()
        v = list(hv)
    return value


def hessian_one_iteration(model, loss_fn, x, y, iters=50, tol=1e-4, generator=None):
    return sam.top_hessian_eigenvalue(model, loss_fn, x, y, iters=1, tol=tol, generator=generator)


def hessian_trace_estimate(model, loss_fn, x, y, iters=50, tol=1e-4, generator=None):  # vᵀHv of one random v
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    v = [torch.randn(p.shape, generator=generator) for p in params]
    hv = torch.autograd.grad(grads, params, grad_outputs=v)
    return sum((h * u).sum() for h, u in zip(hv, v, strict=True)).item()


# --------------------------------------------------------------------------- directions


def direction_loop(model, generator=None):
    out = []
    for p in model.parameters():
        d = torch.zeros_like(p)
        if p.dim() > 1:
            for i in range(p.shape[0]):
                r = torch.randn(p[i].shape, generator=generator)
                d[i] = r / r.norm() * p[i].detach().norm()
        out.append(d)
    return out


def direction_layerwise(model, generator=None):
    out = []
    for p in model.parameters():
        if p.dim() <= 1:
            out.append(torch.zeros_like(p))
        else:
            d = torch.randn(p.shape, generator=generator)
            out.append(d / d.norm() * p.detach().norm())
    return out


def direction_unit_rows(model, generator=None):
    out = []
    for p in model.parameters():
        if p.dim() <= 1:
            out.append(torch.zeros_like(p))
        else:
            d = torch.randn(p.shape, generator=generator).flatten(1)
            out.append((d / d.norm(dim=1, keepdim=True)).view_as(p))
    return out


def direction_bias_random(model, generator=None):
    d = sam.filter_normalized_direction(model, generator)
    return [t if p.dim() > 1 else torch.randn(p.shape, generator=generator)
            for p, t in zip(model.parameters(), d, strict=True)]


def direction_params(model, generator=None):
    return [p.detach().clone() if p.dim() > 1 else torch.zeros_like(p) for p in model.parameters()]


def direction_global_rng(model, generator=None):
    return sam.filter_normalized_direction(model, None)


def direction_columns(model, generator=None):
    out = []
    for p in model.parameters():
        if p.dim() <= 1:
            out.append(torch.zeros_like(p))
        else:
            d = torch.randn(p.shape, generator=generator).flatten(1)
            w = p.detach().flatten(1)
            out.append((d / d.norm(dim=0, keepdim=True) * w.norm(dim=0, keepdim=True)).view_as(p))
    return out


CORRECT = {
    "sam": [SAMForeach],
    "top_hessian_eigenvalue": [hessian_by_torch_func],
    "filter_normalized_direction": [direction_loop],
}

# (wrong answer, a phrase the verdict must contain, or "" when any failure will do)
WRONG = {
    "sam": [
        (SAMRestoreBySubtraction, "ビット単位"),
        (SAMNormPerTensor, "テンソルごと"),
        (SAMBaseStepAtPerturbed, "w + ε で計算"),
        (SAMNeverRestores, "w + ε から"),
        (SAMDescends, "向きが逆"),
        (SAMFixedRho, "rho"),
        (SAMSeedRestore, "2 回目"),
        (SAMOwnGroups, "共有"),
        (SAMAdaptiveAbs, "ASAM"),
    ],
    "top_hessian_eigenvalue": [
        (hessian_gradient_norm, "勾配のノルム"),
        (hessian_backward_create_graph, ".grad"),
        (hessian_one_iteration, "はず"),
        (hessian_trace_estimate, "はず"),
    ],
    "filter_normalized_direction": [
        (direction_layerwise, "層ごと"),
        (direction_unit_rows, "1 にしています"),
        (direction_bias_random, "0 にします"),
        (direction_params, "同じ向き"),
        (direction_global_rng, "同じシード"),
        (direction_columns, "列（dim 1）"),
    ],
}
