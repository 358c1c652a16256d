"""Chapter 8 (work in progress, not yet in _toc.yml): DARTS, a differentiable architecture search.

The search space in full (the candidate operations, the mixed operation, the cell as a DAG, the
network), architecture parameters kept apart from the weights, the first-order architect step on
validation batches and the second-order (finite-difference) one behind a flag, the genotype
derived from the alphas, and the discrete network built from a genotype and trained from scratch.
Sized for scikit-learn's 8×8 digits so that a search runs on a CPU in tens of seconds.
"""

from __future__ import annotations

import math
import time
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PRIMITIVES = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
PARAMETER_FREE = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect")

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")


# =======================================================================================
# Candidate operations: each keeps the spatial size (stride 1) or halves it (stride 2)


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in, c_out, kernel, stride, padding, affine=True):
        super().__init__(nn.ReLU(inplace=False), nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
                         nn.BatchNorm2d(c_out, affine=affine))


class DilConv(nn.Sequential):
    """ReLU, a depthwise dilated convolution, a pointwise convolution, BatchNorm."""

    def __init__(self, c_in, c_out, kernel, stride, padding, dilation, affine=True):
        super().__init__(nn.ReLU(inplace=False),
                         nn.Conv2d(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
                         nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out, affine=affine))


class SepConv(nn.Sequential):
    """Two dilation-1 DilConvs in a row (the separable convolution of DARTS); only the first may stride."""

    def __init__(self, c_in, c_out, kernel, stride, padding, affine=True):
        super().__init__(DilConv(c_in, c_in, kernel, stride, padding, 1, affine),
                         DilConv(c_in, c_out, kernel, 1, padding, 1, affine))


class Zero(nn.Module):
    """The 'none' operation: zeros of the output shape (it lets the search switch an edge off)."""

    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, ::self.stride, ::self.stride] * 0.0


class FactorizedReduce(nn.Module):
    """Halves the spatial size with two stride-2 1×1 convolutions, the second shifted by one pixel,
    so that every input pixel is seen (a single stride-2 1×1 convolution would skip three in four)."""

    def __init__(self, c_in, c_out, affine=True):
        super().__init__()
        assert c_out % 2 == 0, "FactorizedReduce の出力チャネル数は偶数にしてください"
        self.relu = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return self.bn(torch.cat([self.conv1(x), self.conv2(shifted)], dim=1))


def _pool(kind, stride):
    if kind == "max":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)


OPS = {
    "none": lambda c, stride, affine: Zero(stride),
    "max_pool_3x3": lambda c, stride, affine: _pool("max", stride),
    "avg_pool_3x3": lambda c, stride, affine: _pool("avg", stride),
    "skip_connect": lambda c, stride, affine: nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine),
    "sep_conv_3x3": lambda c, stride, affine: SepConv(c, c, 3, stride, 1, affine),
    "sep_conv_5x5": lambda c, stride, affine: SepConv(c, c, 5, stride, 2, affine),
    "dil_conv_3x3": lambda c, stride, affine: DilConv(c, c, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda c, stride, affine: DilConv(c, c, 5, stride, 4, 2, affine),
}


# =======================================================================================
# The mixed operation (reference answer of the exercise "mixed_op")


class MixedOp(nn.Module):
    """Σ_k weights[k] · ops[k](x): every candidate on one edge, weighted by the softmax of the edge's alphas."""

    def __init__(self, ops):
        super().__init__()
        self.ops = nn.ModuleList(ops)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self.ops, strict=True))


def mixed_op_for(c, stride, primitives=PRIMITIVES, mixed_op_class=MixedOp):
    """A mixed op over the given primitives; BatchNorm without affine parameters, as in the DARTS search."""
    return mixed_op_class([OPS[p](c, stride, False) for p in primitives])


# =======================================================================================
# The search cell and network


def preprocess(c_prev_prev, c_prev, c, reduction_prev, affine):
    """The cell's two inputs brought to c channels and to one spatial size. Only when the PREVIOUS cell
    reduced is the input from two cells back still twice as large, so only then is it reduced here."""
    p0 = FactorizedReduce(c_prev_prev, c, affine) if reduction_prev else ReLUConvBN(c_prev_prev, c, 1, 1, 0, affine)
    return p0, ReLUConvBN(c_prev, c, 1, 1, 0, affine)


def edges_per_cell(steps: int) -> int:
    return sum(2 + i for i in range(steps))


class SearchCell(nn.Module):
    """A DAG of ``steps`` intermediate nodes; node i sums a mixed op over each of its 2 + i inputs
    (the two cell inputs and the earlier nodes). The output is the concatenation of the last
    ``multiplier`` nodes: multiplier × c channels."""

    def __init__(self, steps, multiplier, c_prev_prev, c_prev, c, reduction, reduction_prev,
                 primitives=PRIMITIVES, mixed_op_class=MixedOp):
        super().__init__()
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        self.preprocess0, self.preprocess1 = preprocess(c_prev_prev, c_prev, c, reduction_prev, affine=False)
        self.edges = nn.ModuleList(
            mixed_op_for(c, 2 if reduction and j < 2 else 1, primitives, mixed_op_class)
            for i in range(steps) for j in range(2 + i))

    def forward(self, s0, s1, weights):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            states.append(sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states)))
            offset += len(states) - 1
        return torch.cat(states[-self.multiplier:], dim=1)


class SearchNetwork(nn.Module):
    """Stem, ``layers`` cells (the ones in ``reductions`` halve the size and double the channels), global
    pooling and a linear classifier. The architecture parameters (one row of alphas per edge, one column
    per primitive, shared by all normal cells and by all reduction cells) are registered apart from the
    weights: ``weights()`` and ``arch_parameters()`` never overlap."""

    def __init__(self, c=8, num_classes=10, layers=3, steps=4, multiplier=None, stem_multiplier=3, in_channels=1,
                 reductions=None, primitives=PRIMITIVES, mixed_op_class=MixedOp):
        super().__init__()
        self.primitives, self.steps = list(primitives), steps
        multiplier = multiplier or steps              # the cell concatenates its last `multiplier` nodes
        reductions = set(reductions if reductions is not None else [layers // 2])
        c_curr = stem_multiplier * c
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, c
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            cell = SearchCell(steps, multiplier, c_prev_prev, c_prev, c_curr, reduction, reduction_prev,
                              primitives, mixed_op_class)
            self.cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, multiplier * c_curr
        self.classifier = nn.Linear(c_prev, num_classes)
        k = edges_per_cell(steps)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(k, len(self.primitives)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(k, len(self.primitives)))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas_normal, self.alphas_reduce]

    def weights(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def forward(self, x):
        s0 = s1 = self.stem(x)
        w_normal = F.softmax(self.alphas_normal, dim=-1)
        w_reduce = F.softmax(self.alphas_reduce, dim=-1)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))


# =======================================================================================
# The architect: one update of the alphas on a validation batch


def architect_step(model: SearchNetwork, alpha_optimizer: torch.optim.Optimizer, x_val: torch.Tensor,
                   y_val: torch.Tensor) -> float:
    """First-order DARTS: the gradient of the validation loss with respect to the alphas at the current
    weights, one step of the alphas' own optimizer; the weights do not move. Returns the loss."""
    alpha_optimizer.zero_grad()
    loss = F.cross_entropy(model(x_val), y_val)
    alphas = model.arch_parameters()
    grads = torch.autograd.grad(loss, alphas)       # only the alphas' gradients: the weights' .grad stay untouched
    for a, g in zip(alphas, grads, strict=True):
        a.grad = g
    alpha_optimizer.step()
    return loss.item()


def architect_step_second_order(model: SearchNetwork, alpha_optimizer: torch.optim.Optimizer, x_train, y_train,
                                x_val, y_val, xi: float) -> float:
    """Second-order DARTS (Liu et al., 2019, eq. 7–8): the validation gradient at the weights after one
    virtual SGD step w' = w − ξ ∇_w L_train, minus ξ times a Hessian-vector product estimated by finite
    differences: (∇_α L_train(w⁺) − ∇_α L_train(w⁻)) / 2ε with w± = w ± ε ∇_{w'} L_val(w', α)."""
    weights, alphas = model.weights(), model.arch_parameters()
    backup = [w.detach().clone() for w in weights]
    g_train = torch.autograd.grad(F.cross_entropy(model(x_train), y_train), weights)
    with torch.no_grad():                                      # the virtual step to w'
        for w, g in zip(weights, g_train, strict=True):
            w.sub_(xi * g)
    val_loss = F.cross_entropy(model(x_val), y_val)
    grads = torch.autograd.grad(val_loss, alphas + weights)
    d_alpha, d_w = grads[:len(alphas)], grads[len(alphas):]
    eps = 0.01 / torch.sqrt(sum((g ** 2).sum() for g in d_w)).clamp_min(1e-12)
    hessian_terms = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for w, b, g in zip(weights, backup, d_w, strict=True):
                w.copy_(b + sign * eps * g)
        hessian_terms.append(torch.autograd.grad(F.cross_entropy(model(x_train), y_train), alphas))
    with torch.no_grad():
        for w, b in zip(weights, backup, strict=True):
            w.copy_(b)
    alpha_optimizer.zero_grad()
    for a, g, hp, hm in zip(alphas, d_alpha, *hessian_terms, strict=True):
        a.grad = g - xi * (hp - hm) / (2 * eps)
    alpha_optimizer.step()
    return val_loss.item()


# =======================================================================================
# From alphas to a discrete cell (reference answer of the exercise "derive_genotype")


def derive_genotype(alphas: torch.Tensor, primitives, steps: int, k: int = 2) -> list[tuple[str, int]]:
    """For each intermediate node (node i has 2 + i incoming edges, rows of ``alphas`` in that order),
    keep the k incoming edges whose strongest non-'none' operation has the largest softmax weight, each
    with that operation; node by node, the stronger edge first."""
    weights = F.softmax(alphas.detach().double(), dim=-1)
    none = list(primitives).index("none") if "none" in primitives else None
    gene, start = [], 0
    for i in range(steps):
        n = 2 + i
        rows = weights[start:start + n].clone()
        if none is not None:
            rows[:, none] = -1.0
        best_weight, best_op = rows.max(dim=-1)
        strongest = sorted(range(n), key=lambda j: -best_weight[j].item())[:k]
        gene.extend((primitives[int(best_op[j])], j) for j in strongest)
        start += n
    return gene


def genotype_of(model: SearchNetwork, k: int = 2) -> Genotype:
    concat = list(range(2, 2 + model.steps))
    return Genotype(derive_genotype(model.alphas_normal, model.primitives, model.steps, k), concat,
                    derive_genotype(model.alphas_reduce, model.primitives, model.steps, k), concat)


def random_genotype(rng: np.random.Generator, steps: int = 4, k: int = 2, primitives=PRIMITIVES) -> Genotype:
    """An architecture drawn uniformly from the same discrete space (k distinct inputs per node, no 'none')."""
    choices = [p for p in primitives if p != "none"]

    def cell():
        gene = []
        for i in range(steps):
            inputs = rng.choice(2 + i, size=k, replace=False)
            gene.extend((choices[rng.integers(len(choices))], int(j)) for j in inputs)
        return gene

    concat = list(range(2, 2 + steps))
    return Genotype(cell(), concat, cell(), concat)


# =======================================================================================
# The discrete network built from a genotype


class DiscreteCell(nn.Module):
    def __init__(self, gene, concat, c_prev_prev, c_prev, c, reduction, reduction_prev, k=2):
        super().__init__()
        self.reduction, self.concat, self.k = reduction, list(concat), k
        self.preprocess0, self.preprocess1 = preprocess(c_prev_prev, c_prev, c, reduction_prev, affine=True)
        self.inputs = [j for _, j in gene]
        self.ops = nn.ModuleList(OPS[name](c, 2 if reduction and j < 2 else 1, True) for name, j in gene)

    def forward(self, s0, s1):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(len(self.ops) // self.k):
            pairs = range(node * self.k, (node + 1) * self.k)
            states.append(sum(self.ops[e](states[self.inputs[e]]) for e in pairs))
        return torch.cat([states[i] for i in self.concat], dim=1)


class DiscreteNetwork(nn.Module):
    def __init__(self, genotype: Genotype, c=8, num_classes=10, layers=3, stem_multiplier=3, in_channels=1,
                 reductions=None, k=2):
        super().__init__()
        reductions = set(reductions if reductions is not None else [layers // 2])
        c_curr = stem_multiplier * c
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, c
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            gene, concat = (genotype.reduce, genotype.reduce_concat) if reduction else (genotype.normal,
                                                                                        genotype.normal_concat)
            self.cells.append(DiscreteCell(gene, concat, c_prev_prev, c_prev, c_curr, reduction, reduction_prev, k))
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, len(concat) * c_curr
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(self, x):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# =======================================================================================
# Data: scikit-learn's digits, 8×8 grey images, split into train / validation / test


def digits_splits(seed: int = 0, n_val: int = 400, n_test: int = 400):
    """(x, y) tensors for the weights' training set, the alphas' validation set and a held-out test set."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return (x[train], y[train]), (x[val], y[val]), (x[test], y[test])


def shifted_digits_splits(seed: int = 0, size: int = 16, noise: float = 0.5, n_train: int = 400,
                          n_val: int = 200, n_test: int = 400):
    """A harder task made from the same digits: each 8×8 image pasted at a random position of a size×size
    canvas of Gaussian noise (σ = noise), with few training images. On plain digits every architecture of
    the space reaches 92–99 %; here they spread out (measured 65–83 % after 20 epochs), so a search has
    something to find."""
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = digits_splits(seed, n_val=n_val, n_test=n_test)
    g = torch.Generator().manual_seed(seed + 1)

    def paste(x):
        out = torch.randn(len(x), 1, size, size, generator=g) * noise
        rows = torch.randint(0, size - 7, (len(x),), generator=g)
        cols = torch.randint(0, size - 7, (len(x),), generator=g)
        for i in range(len(x)):
            out[i, :, rows[i]:rows[i] + 8, cols[i]:cols[i] + 8] += x[i]
        return out

    return (paste(x_tr[:n_train]), y_tr[:n_train]), (paste(x_val), y_val), (paste(x_te), y_te)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    was_training = model.training
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item() for i in range(0, len(y), batch))
    model.train(was_training)
    return correct / len(y)


# =======================================================================================
# The search


@dataclass
class SearchConfig:
    c: int = 8
    layers: int = 3
    steps: int = 4
    epochs: int = 20
    batch_size: int = 64
    w_lr: float = 0.05
    w_momentum: float = 0.9
    w_weight_decay: float = 3e-4
    alpha_lr: float = 3e-3
    alpha_weight_decay: float = 1e-3
    grad_clip: float = 5.0
    second_order: bool = False
    warmup_epochs: int = 0           # epochs that train the weights only, before the alphas start to move
    seed: int = 0


def entropy_per_edge(alphas: torch.Tensor) -> torch.Tensor:
    p = F.softmax(alphas.detach(), dim=-1)
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def search(cfg: SearchConfig, data=None, log=None) -> dict:
    """Alternate an architect step on a validation batch and a weight step on a training batch; record
    the alphas, each edge's entropy and the validation accuracy after every epoch."""
    torch.manual_seed(cfg.seed)
    (x_tr, y_tr), (x_val, y_val), _ = data if data is not None else digits_splits(cfg.seed)
    model = SearchNetwork(cfg.c, 10, cfg.layers, cfg.steps)
    w_opt = torch.optim.SGD(model.weights(), lr=cfg.w_lr, momentum=cfg.w_momentum, weight_decay=cfg.w_weight_decay)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=cfg.alpha_lr, betas=(0.5, 0.999),
                             weight_decay=cfg.alpha_weight_decay)
    steps_per_epoch = math.ceil(len(y_tr) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, cfg.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(cfg.seed)
    history = {"alphas_normal": [], "alphas_reduce": [], "entropy_normal": [], "entropy_reduce": [],
               "val_acc": [], "seconds": []}
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(y_tr), generator=g)
        val_order = torch.randint(len(y_val), (len(y_tr),), generator=g)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            vidx = val_order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            if epoch < cfg.warmup_epochs:
                pass
            elif cfg.second_order:
                architect_step_second_order(model, a_opt, x_tr[idx], y_tr[idx], x_val[vidx], y_val[vidx],
                                            xi=sched.get_last_lr()[0])
            else:
                architect_step(model, a_opt, x_val[vidx], y_val[vidx])
            w_opt.zero_grad()
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            nn.utils.clip_grad_norm_(model.weights(), cfg.grad_clip)
            w_opt.step()
            sched.step()
        history["alphas_normal"].append(model.alphas_normal.detach().clone())
        history["alphas_reduce"].append(model.alphas_reduce.detach().clone())
        history["entropy_normal"].append(entropy_per_edge(model.alphas_normal))
        history["entropy_reduce"].append(entropy_per_edge(model.alphas_reduce))
        history["val_acc"].append(accuracy(model, x_val, y_val))
        history["seconds"].append(time.perf_counter() - start)
        if log:
            log(f"エポック {epoch + 1:3d}  検証の正解率 {history['val_acc'][-1]:.3f}  "
                f"経過 {history['seconds'][-1]:5.1f} 秒  normal: {genotype_of(model).normal}")
    return {"model": model, "genotype": genotype_of(model), "history": history}


def train_discrete(genotype: Genotype, seed: int = 0, epochs: int = 30, c: int = 8, layers: int = 3,
                   batch_size: int = 64, lr: float = 0.05, data=None) -> dict:
    """Train the network built from ``genotype`` from scratch on train + validation; test accuracy."""
    torch.manual_seed(seed)
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = data if data is not None else digits_splits(0)
    x, y = torch.cat([x_tr, x_val]), torch.cat([y_tr, y_val])
    model = DiscreteNetwork(genotype, c, 10, layers)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=3e-4, nesterov=True)
    steps = math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for b in range(steps):
            idx = order[b * batch_size:(b + 1) * batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
    return {"test_acc": accuracy(model, x_te, y_te), "params": count_parameters(model),
            "seconds": time.perf_counter() - start, "model": model}
