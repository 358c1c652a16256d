"""Chapter 8: DARTS, a differentiable architecture search, end to end.

The search space in full (the candidate operations, the mixed operation, the cell as a DAG, the
network), architecture parameters kept apart from the weights, the first-order architect step on
validation batches and the second-order (finite-difference) one behind a flag, the genotype
derived from the alphas, the discrete network built from a genotype and trained from scratch, and
the stored reference experiment (searches with and without warm-up and a longer one, 3 seeds each,
against architectures drawn at random from the same space, every one retrained with 3 seeds).
Sized for a task made from scikit-learn's digits so that a search runs on a CPU in about 2 minutes.
"""

from __future__ import annotations

import json
import math
import time
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .instruments import evaluate_classifier

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
    """Halves the spatial size with two stride-2 1×1 convolutions, the second on the input shifted by one
    pixel diagonally: together they read two pixels of every 2×2 block instead of one."""

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


def search_op(primitive, c, stride):
    """A candidate as the search uses it: BatchNorm without affine parameters, and a pool followed by one, so
    that every candidate's output is normalised the same way before the mixed op weighs them (as in DARTS)."""
    op = OPS[primitive](c, stride, False)
    if "pool" in primitive:
        op = nn.Sequential(op, nn.BatchNorm2d(c, affine=False))
    return op


def mixed_op_for(c, stride, primitives=PRIMITIVES, mixed_op_class=MixedOp):
    """A mixed op over the given primitives, each as the search uses it."""
    return mixed_op_class([search_op(p, c, stride) for p in primitives])


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


def cell_plan(c, layers, reductions, multiplier, stem_multiplier=3):
    """The channels of every cell of a network: a list of (c_prev_prev, c_prev, c, reduction, reduction_prev),
    one per cell, and the channels of the last cell's output. A reduction cell doubles c; a cell's output
    has multiplier × c channels (the concatenation of its last nodes), which is what the next cells get."""
    c_prev_prev = c_prev = stem_multiplier * c
    plan, reduction_prev = [], False
    for i in range(layers):
        reduction = i in reductions
        if reduction:
            c *= 2
        plan.append((c_prev_prev, c_prev, c, reduction, reduction_prev))
        reduction_prev = reduction
        c_prev_prev, c_prev = c_prev, multiplier * c
    return plan, c_prev


def stem(in_channels, c_out):
    return nn.Sequential(nn.Conv2d(in_channels, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))


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
        plan, c_out = cell_plan(c, layers, set(reductions if reductions is not None else [layers // 2]),
                                multiplier, stem_multiplier)
        self.stem = stem(in_channels, stem_multiplier * c)
        self.cells = nn.ModuleList(SearchCell(steps, multiplier, *channels, primitives, mixed_op_class)
                                   for channels in plan)
        self.classifier = nn.Linear(c_out, num_classes)
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


def architect_step(model, alpha_optimizer, x_val, y_val):
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
                                x_val, y_val, xi: float, eps_scale: float = 0.01) -> float:
    """Second-order DARTS (Liu et al., 2019, eq. 7–8): the validation gradient at the weights after one
    virtual SGD step w' = w − ξ ∇_w L_train, minus ξ times a Hessian-vector product estimated by finite
    differences: (∇_α L_train(w⁺) − ∇_α L_train(w⁻)) / 2ε with w± = w ± ε ∇_{w'} L_val(w', α) and
    ε = eps_scale / ‖∇_{w'} L_val‖ (the paper's 0.01). ReLU and max-pool kinks make the difference only an
    approximation at that ε; it tends to the exact product as eps_scale → 0 (tested in float64)."""
    weights, alphas = model.weights(), model.arch_parameters()
    backup = [w.detach().clone() for w in weights]
    g_train = torch.autograd.grad(F.cross_entropy(model(x_train), y_train), weights)
    with torch.no_grad():                                      # the virtual step to w'
        for w, g in zip(weights, g_train, strict=True):
            w.sub_(xi * g)
    val_loss = F.cross_entropy(model(x_val), y_val)
    grads = torch.autograd.grad(val_loss, alphas + weights)
    d_alpha, d_w = grads[:len(alphas)], grads[len(alphas):]
    eps = eps_scale / torch.sqrt(sum((g ** 2).sum() for g in d_w)).clamp_min(1e-12)
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


def draw_genotype(ax, gene, steps: int, title: str = "", k: int = 2, reduction: bool = False) -> None:
    """Draw a cell as a graph: the two inputs on the left, the intermediate nodes, the output (their
    concatenation) on the right; each kept edge labelled with its operation, parameter-free ones in orange."""
    from matplotlib.patches import FancyArrowPatch

    pos = {0: (0.0, 1.0), 1: (0.0, -1.0)}
    for i in range(steps):
        pos[2 + i] = (1.6 + 1.5 * i, 0.9 if i % 2 == 0 else -0.9)
    out = (1.6 + 1.5 * steps, 0.0)
    names = {0: "$c_{k-2}$", 1: "$c_{k-1}$", **{2 + i: str(i) for i in range(steps)}}
    for e, (op, j) in enumerate(gene):
        node = 2 + e // k
        (x0, y0), (x1, y1) = pos[j], pos[node]
        colour = "tab:blue" if has_parameters(op, j, reduction) else "tab:orange"
        bend = 0.25 if (node - j) % 2 else -0.25
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), connectionstyle=f"arc3,rad={bend}", arrowstyle="-|>",
                                     mutation_scale=12, color=colour, lw=1.4, shrinkA=14, shrinkB=14))
        cx, cy = (x0 + x1) / 2 + bend * (y1 - y0), (y0 + y1) / 2 - bend * (x1 - x0)   # the arc's control point
        t = 0.62                                       # the label nearer the node the edge enters (fewer overlaps)
        mx = (1 - t) ** 2 * x0 + 2 * t * (1 - t) * cx + t ** 2 * x1
        my = (1 - t) ** 2 * y0 + 2 * t * (1 - t) * cy + t ** 2 * y1
        ax.text(mx, my, op.replace("_3x3", "3").replace("_5x5", "5").replace("_connect", "").replace("_pool", "pool"),
                fontsize=7, ha="center", va="center", color=colour,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
    for i in range(steps):
        ax.add_patch(FancyArrowPatch(pos[2 + i], out, arrowstyle="-|>", mutation_scale=10, color="0.6", lw=0.8,
                                     linestyle="--", shrinkA=14, shrinkB=16))
    for node, (x, y) in {**pos, "out": out}.items():
        fill = "#dde8f5" if node in (0, 1) else ("#e8e8e8" if node == "out" else "#fdf0d5")
        ax.text(x, y, "出力" if node == "out" else names[node], ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "circle,pad=0.3" if node != "out" else "round,pad=0.4", "fc": fill, "ec": "0.3"})
    ax.set_xlim(-0.6, out[0] + 0.6)
    ax.set_ylim(-1.7, 1.7)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)


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
        assert len(genotype.normal_concat) == len(genotype.reduce_concat), "normal と reduce の出力ノード数を揃えます"
        plan, c_out = cell_plan(c, layers, set(reductions if reductions is not None else [layers // 2]),
                                len(genotype.normal_concat), stem_multiplier)
        self.stem = stem(in_channels, stem_multiplier * c)
        self.cells = nn.ModuleList(
            DiscreteCell(*((genotype.reduce, genotype.reduce_concat) if reduction else
                           (genotype.normal, genotype.normal_concat)),
                         c_pp, c_p, c_cell, reduction, reduction_prev, k)
            for c_pp, c_p, c_cell, reduction, reduction_prev in plan)
        self.classifier = nn.Linear(c_out, num_classes)

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
    the space reaches 92–99 %; here they spread out, so a search has
    something to find (the chapter's stored runs: 0.74–0.85 for 12 architectures, 3 retrainings each)."""
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
    primitives: tuple = tuple(PRIMITIVES)   # the candidates on every edge ('none' may be left out)


def entropy_per_edge(alphas: torch.Tensor) -> torch.Tensor:
    p = F.softmax(alphas.detach(), dim=-1)
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def parameter_free_share(alphas: torch.Tensor, primitives=PRIMITIVES) -> float:
    """The softmax weight on the parameter-free operations other than 'none' (pools, skip), mean over edges."""
    p = F.softmax(alphas.detach(), dim=-1)
    columns = [i for i, name in enumerate(primitives) if name in PARAMETER_FREE and name != "none"]
    return p[:, columns].sum(-1).mean().item()


def has_parameters(name: str, input_index: int, reduction: bool = False) -> bool:
    """Whether an edge's operation has parameters: the convolutions, and skip_connect on a reduction cell's
    edge from a cell input (stride 2 makes it a FactorizedReduce)."""
    if name == "skip_connect":
        return reduction and input_index < 2
    return name not in PARAMETER_FREE


def parameter_free_count(gene, reduction: bool = False) -> int:
    """How many of a derived cell's operations have no parameters (pools, and skip_connect where it is an identity)."""
    return sum(not has_parameters(name, j, reduction) for name, j in gene)


def memory_layout(device) -> torch.memory_format:
    """Channels last (each pixel's channels side by side in memory) on the CPU, where it makes the backward
    pass of the depthwise 5×5 and dilated convolutions and max pooling 1.5-4× faster (a search step here:
    2.8 s → 1.8 s); the same results up to rounding. PyTorch's default layout elsewhere."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def search(cfg: SearchConfig, data=None, log=None, progress: bool = False, mixed_op_class=None,
           architect=None, device="cpu") -> dict:
    """Alternate an architect step on a validation batch and a weight step on a training batch; record
    after every epoch the alphas, each edge's entropy, the genotype they give and the validation accuracy.
    ``mixed_op_class`` and ``architect`` replace the reference MixedOp and architect_step (the reader's own)."""
    mixed_op_class, architect = mixed_op_class or MixedOp, architect or architect_step
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    (x_tr, y_tr), (x_val, y_val), _ = data if data is not None else shifted_digits_splits(0)
    layout = memory_layout(device)
    x_tr, x_val = (t.to(device, memory_format=layout) for t in (x_tr, x_val))
    y_tr, y_val = y_tr.to(device), y_val.to(device)
    model = SearchNetwork(cfg.c, 10, cfg.layers, cfg.steps, in_channels=x_tr.shape[1], primitives=cfg.primitives,
                          mixed_op_class=mixed_op_class).to(device, memory_format=layout)
    w_opt = torch.optim.SGD(model.weights(), lr=cfg.w_lr, momentum=cfg.w_momentum, weight_decay=cfg.w_weight_decay,
                            foreach=True)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=cfg.alpha_lr, betas=(0.5, 0.999),
                             weight_decay=cfg.alpha_weight_decay)
    steps_per_epoch = math.ceil(len(y_tr) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, cfg.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(cfg.seed)
    history = {"alphas_normal": [], "alphas_reduce": [], "entropy_normal": [], "entropy_reduce": [],
               "genotype": [], "val_acc": [], "seconds": []}
    start = time.perf_counter()
    for epoch in tqdm(range(cfg.epochs), desc="探索", disable=not progress):
        order = torch.randperm(len(y_tr), generator=g)
        val_order = torch.randint(len(y_val), (len(y_tr),), generator=g)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            vidx = val_order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            if epoch < cfg.warmup_epochs:
                pass                                               # warm-up: the weights only
            elif cfg.second_order:
                architect_step_second_order(model, a_opt, x_tr[idx], y_tr[idx], x_val[vidx], y_val[vidx],
                                            xi=sched.get_last_lr()[0])
            else:
                architect(model, a_opt, x_val[vidx], y_val[vidx])
            w_opt.zero_grad()
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            nn.utils.clip_grad_norm_(model.weights(), cfg.grad_clip)
            w_opt.step()
            sched.step()
        history["alphas_normal"].append(model.alphas_normal.detach().cpu().clone())
        history["alphas_reduce"].append(model.alphas_reduce.detach().cpu().clone())
        history["entropy_normal"].append(entropy_per_edge(history["alphas_normal"][-1]))
        history["entropy_reduce"].append(entropy_per_edge(history["alphas_reduce"][-1]))
        history["genotype"].append(genotype_of(model))
        history["val_acc"].append(evaluate_classifier(model, x_val, y_val, device)["accuracy"])
        history["seconds"].append(time.perf_counter() - start)
        if log:
            log(f"エポック {epoch + 1:3d}  検証の正解率 {history['val_acc'][-1]:.3f}  "
                f"経過 {history['seconds'][-1]:5.1f} 秒  normal のパラメータなし演算 "
                f"{parameter_free_count(history['genotype'][-1].normal)}/{len(history['genotype'][-1].normal)}")
    return {"model": model, "genotype": genotype_of(model), "history": history}


def train_discrete(genotype: Genotype, seed: int = 0, epochs: int = 20, c: int = 8, layers: int = 3,
                   batch_size: int = 64, lr: float = 0.05, data=None, progress: bool = False, device="cpu") -> dict:
    """Train the network built from ``genotype`` from scratch on train + validation; test accuracy."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = data if data is not None else shifted_digits_splits(0)
    layout = memory_layout(device)
    x, y = torch.cat([x_tr, x_val]).to(device, memory_format=layout), torch.cat([y_tr, y_val]).to(device)
    model = DiscreteNetwork(genotype, c, 10, layers, in_channels=x.shape[1]).to(device, memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=3e-4, nesterov=True, foreach=True)
    steps = math.ceil(len(y) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in tqdm(range(epochs), desc="再学習", disable=not progress):
        order = torch.randperm(len(y), generator=g)
        for b in range(steps):
            idx = order[b * batch_size:(b + 1) * batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
    return {"test_acc": evaluate_classifier(model, x_te, y_te, device)["accuracy"], "params": count_parameters(model),
            "seconds": time.perf_counter() - start, "model": model}


# =======================================================================================
# The stored reference experiment: DARTS with and without warm-up (3 search seeds) against architectures
# drawn at random from the same space, every architecture retrained with the same budget and 3 seeds.

SEARCH_CSV = "darts_search.csv"
RETRAIN_CSV = "darts_retrain.csv"
REFERENCE = {
    "search": {"c": 8, "layers": 3, "steps": 4, "epochs": 15, "batch_size": 64, "alpha_lr": 1e-2},
    "variants": {"darts": {}, "darts_warmup": {"warmup_epochs": 5}, "darts_long": {"epochs": 40}},
    "retrain": {"epochs": 20, "c": 8, "layers": 3},
    "search_seeds": (0, 1, 2),
    "random_architectures": 3,
    "train_seeds": (0, 1, 2),
    "data_seed": 0,
}


def reference_search_config(variant: str, seed: int) -> SearchConfig:
    return SearchConfig(**{**REFERENCE["search"], **REFERENCE["variants"][variant], "seed": seed})


def genotype_to_text(genotype: Genotype) -> str:
    return json.dumps(genotype._asdict())


def genotype_from_text(text: str) -> Genotype:
    d = json.loads(text)
    return Genotype([tuple(x) for x in d["normal"]], d["normal_concat"], [tuple(x) for x in d["reduce"]],
                    d["reduce_concat"])


def _search_job(job):
    variant, seed = job
    torch.set_num_threads(1)                 # one core per job, so that two jobs can share two cores
    cfg = reference_search_config(variant, seed)
    h = search(cfg, shifted_digits_splits(REFERENCE["data_seed"]))["history"]
    return [{"variant": variant, "seed": seed, "epoch": e + 1, "val_acc": round(h["val_acc"][e], 4),
             "seconds": round(h["seconds"][e], 1),
             "parameter_free_normal": parameter_free_count(h["genotype"][e].normal),
             "parameter_free_reduce": parameter_free_count(h["genotype"][e].reduce, reduction=True),
             "parameter_free_share_normal": round(parameter_free_share(h["alphas_normal"][e]), 4),
             "entropy_normal": round(h["entropy_normal"][e].mean().item(), 4),
             "entropy_reduce": round(h["entropy_reduce"][e].mean().item(), 4),
             "genotype": genotype_to_text(h["genotype"][e])} for e in range(cfg.epochs)]


def _retrain_job(job):
    architecture, genotype_text, train_seed = job
    torch.set_num_threads(1)
    r = train_discrete(genotype_from_text(genotype_text), seed=train_seed, **REFERENCE["retrain"],
                       data=shifted_digits_splits(REFERENCE["data_seed"]))
    return {"architecture": architecture, "train_seed": train_seed, "test_acc": round(r["test_acc"], 4),
            "params": r["params"], "seconds": round(r["seconds"], 1), "genotype": genotype_text}


def random_architectures() -> list[tuple[str, Genotype]]:
    """The reference's random architectures: random0, random1, ... drawn in turn from one generator."""
    rng = np.random.default_rng(REFERENCE["data_seed"])
    return [(f"random{i}", random_genotype(rng, REFERENCE["search"]["steps"]))
            for i in range(REFERENCE["random_architectures"])]


def write_reference_experiment(directory, variants=None, random: bool = True, jobs: int = 2) -> None:
    """Run the searches of ``variants`` (all by default) and retrain their last cells, and the random
    architectures when ``random``; rows already in the directory's CSVs for anything else are kept."""
    import csv
    import multiprocessing as mp
    from pathlib import Path

    directory = Path(directory)
    variants = list(variants or REFERENCE["variants"])
    with mp.get_context("spawn").Pool(jobs) as pool:
        searches = pool.map(_search_job, [(v, s) for v in variants for s in REFERENCE["search_seeds"]], chunksize=1)
        architectures = [(f"{rows[-1]['variant']}_seed{rows[-1]['seed']}", rows[-1]["genotype"]) for rows in searches]
        if random:
            architectures += [(name, genotype_to_text(g)) for name, g in random_architectures()]
        retrained = pool.map(_retrain_job, [(name, text, s) for name, text in architectures
                                            for s in REFERENCE["train_seeds"]], chunksize=1)
    old_search, old_retrain = ([], [])
    if (directory / SEARCH_CSV).exists() and (directory / RETRAIN_CSV).exists():
        old_search, old_retrain = read_reference_experiment(directory)
    redone = {name for name, _ in architectures}
    search_rows = [r for r in old_search if r["variant"] not in variants] + [r for rows in searches for r in rows]
    retrain_rows = [r for r in old_retrain if r["architecture"] not in redone] + retrained
    order = list(REFERENCE["variants"])
    search_rows.sort(key=lambda r: (order.index(r["variant"]), r["seed"], r["epoch"]))
    kind = [*order, "random"]
    retrain_rows.sort(key=lambda r: (kind.index(r["architecture"].split("_seed")[0].rstrip("0123456789")),
                                     r["architecture"], r["train_seed"]))
    for name, rows in ((SEARCH_CSV, search_rows), (RETRAIN_CSV, retrain_rows)):
        with open(directory / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def read_reference_experiment(directory=None) -> tuple[list[dict], list[dict]]:
    """The stored (search rows, retrain rows): the package's CSVs unless ``directory`` is given."""
    import csv
    from pathlib import Path

    directory = Path(directory) if directory is not None else Path(__file__).resolve().parent / "data"
    out = []
    for name in (SEARCH_CSV, RETRAIN_CSV):
        with open(directory / name, encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            for key, value in row.items():
                if key not in ("variant", "architecture", "genotype"):
                    row[key] = float(value) if "." in value else int(value)
        out.append(rows)
    return out[0], out[1]


if __name__ == "__main__":
    # Regenerates the stored reference experiment (about 45 minutes on 2 cores, two jobs side by side):
    #   python -m solutions.darts --out solutions/data
    import argparse

    parser = argparse.ArgumentParser(description="第8章の参照の実験（DARTS とウォームアップ付き DARTS の探索、"
                                                 "ランダムなアーキテクチャとの比較）を実行して CSV に書きます")
    parser.add_argument("--out", default="solutions/data")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(REFERENCE["variants"]),
                        help="探索をやり直す設定（既定: すべて）。ほかの設定の行は --out の CSV から引き継ぎます")
    parser.add_argument("--no-random", action="store_true", help="ランダムなアーキテクチャの再学習をしない")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    from solutions.darts import write_reference_experiment as write  # the importable module, for the workers

    write(args.out, variants=args.variants, random=not args.no_random, jobs=args.jobs)
