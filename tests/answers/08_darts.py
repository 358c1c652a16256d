"""Chapter 8's answer cases for the checker (used by tests/test_exercises.py).

``CORRECT``: answers written differently from the reference that must pass.
``WRONG``: the mistakes readers actually make, each with a phrase the verdict must contain.
"""

import heapq

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------- mixed_op


class MixedOpStacked(nn.Module):
    """Correct: every output stacked on a new first axis, weights broadcast over it."""

    def __init__(self, ops):
        super().__init__()
        self.ops = nn.ModuleList(ops)

    def forward(self, x, weights):
        outs = torch.stack([op(x) for op in self.ops])          # (K, B, C, H, W)
        return (weights.view(-1, 1, 1, 1, 1) * outs).sum(0)


class MixedOpEinsum(nn.Module):
    """Correct: the same sum written with einsum, the loop over ops by index."""

    def __init__(self, ops):
        super().__init__()
        self.ops = nn.ModuleList()
        for op in ops:
            self.ops.append(op)

    def forward(self, x, weights):
        outs = torch.stack([self.ops[k](x) for k in range(len(self.ops))])
        return torch.einsum("k,kbchw->bchw", weights, outs)


class _Base(nn.Module):
    def __init__(self, ops):
        super().__init__()
        self.ops = nn.ModuleList(ops)


class MixedOpUnweighted(_Base):
    """Wrong: the weights are never applied."""

    def forward(self, x, weights):
        return sum(op(x) for op in self.ops)


class MixedOpSoftmaxAgain(_Base):
    """Wrong: softmax applied to weights that already are a softmax."""

    def forward(self, x, weights):
        w = F.softmax(weights, dim=0)
        return sum(wk * op(x) for wk, op in zip(w, self.ops, strict=True))


class MixedOpArgmax(_Base):
    """Wrong: only the strongest operation (the discrete choice belongs to the end of the search)."""

    def forward(self, x, weights):
        return self.ops[int(weights.argmax())](x)


class MixedOpPlainList(nn.Module):
    """Wrong: the candidates in a Python list, so their parameters are not registered."""

    def __init__(self, ops):
        super().__init__()
        self.ops = list(ops)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self.ops, strict=True))


class MixedOpDetached(_Base):
    """Wrong: the right values, but no gradient reaches the weights (and so the alphas)."""

    def forward(self, x, weights):
        return sum(w.item() * op(x) for w, op in zip(weights, self.ops, strict=True))


class MixedOpMean(_Base):
    """Wrong: the weighted sum divided by the number of candidates."""

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self.ops, strict=True)) / len(self.ops)


# --------------------------------------------------------------------------- derive_genotype


def genotype_in_numpy(alphas, primitives, steps, k=2):
    """Correct: NumPy, a hand-written softmax, argsort for the ranking."""
    a = alphas.detach().cpu().double().numpy()
    w = np.exp(a - a.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    w[:, primitives.index("none")] = -1.0
    gene, start = [], 0
    for i in range(steps):
        rows = w[start:start + 2 + i]
        order = np.argsort(-rows.max(axis=1), kind="stable")[:k]
        gene += [(primitives[int(rows[j].argmax())], int(j)) for j in order]
        start += 2 + i
    return gene


def genotype_with_topk(alphas, primitives, steps, k=2):
    """Correct: 'none' masked with −inf after the softmax, torch.topk per node over the rows' maxima."""
    w = torch.softmax(alphas.detach(), dim=1)
    w[:, primitives.index("none")] = float("-inf")
    best, ops = w.max(dim=1)
    gene = []
    node_starts = [sum(2 + j for j in range(i)) for i in range(steps)]
    for i, start in enumerate(node_starts):
        top = torch.topk(best[start:start + 2 + i], k).indices
        gene.extend((primitives[ops[start + j].item()], j.item()) for j in top)
    return gene


def genotype_with_heap(alphas, primitives, steps, k=2):
    """Correct: plain Python lists and heapq.nlargest; returns lists instead of tuples."""
    rows = torch.softmax(alphas.detach().double(), -1).tolist()
    none = primitives.index("none")
    out, r = [], 0
    for i in range(steps):
        cands = []
        for j in range(2 + i):
            op = max((p for p in range(len(primitives)) if p != none), key=lambda p: rows[r + j][p])
            cands.append((rows[r + j][op], j, op))
        out += [[primitives[op], j] for _, j, op in heapq.nlargest(k, cands)]
        r += 2 + i
    return out


def _gene(alphas, primitives, steps, k, *, softmax_dim=-1, exclude_none_from_ops=True,
          exclude_none_from_rank=True, per_node=True, strongest_first=True):
    a = alphas.detach().double()
    w = a if softmax_dim is None else torch.softmax(a, softmax_dim)
    none = primitives.index("none")
    cands, start = [], 0
    for i in range(steps):
        for j in range(2 + i):
            row = w[start + j].clone()
            rank = row.max().item()
            masked = row.clone()
            masked[none] = -float("inf")
            op = int(masked.argmax()) if exclude_none_from_ops else int(row.argmax())
            if exclude_none_from_rank:
                rank = masked.max().item()
            cands.append((i, j, primitives[op], rank))
        start += 2 + i
    if not per_node:
        keep = set(sorted(range(len(cands)), key=lambda c: -cands[c][3])[:steps * k])
        return [(cands[c][2], cands[c][1]) for c in sorted(keep, key=lambda c: (cands[c][0], -cands[c][3]))]
    gene = []
    for i in range(steps):
        node = sorted([c for c in cands if c[0] == i], key=lambda c: -c[3])[:k]
        if not strongest_first:
            node.sort(key=lambda c: c[1])
        gene += [(name, j) for _, j, name, _ in node]
    return gene


def genotype_chooses_none(alphas, primitives, steps, k=2):
    """Wrong: 'none' neither removed from the operations nor from the ranking."""
    return _gene(alphas, primitives, steps, k, exclude_none_from_ops=False, exclude_none_from_rank=False)


def genotype_ranked_by_none(alphas, primitives, steps, k=2):
    """Wrong: the operation excludes 'none', but edges are ranked by the row's maximum, 'none' included."""
    return _gene(alphas, primitives, steps, k, exclude_none_from_rank=False)


def genotype_over_the_cell(alphas, primitives, steps, k=2):
    """Wrong: the steps·k strongest edges of the whole cell, not k per node."""
    return _gene(alphas, primitives, steps, k, per_node=False)


def genotype_softmax_over_edges(alphas, primitives, steps, k=2):
    """Wrong: softmax over dim 0 (each operation's column over the edges)."""
    return _gene(alphas, primitives, steps, k, softmax_dim=0)


def genotype_without_softmax(alphas, primitives, steps, k=2):
    """Wrong: edges compared by their raw alphas."""
    return _gene(alphas, primitives, steps, k, softmax_dim=None)


def genotype_in_input_order(alphas, primitives, steps, k=2):
    """Wrong: the right edges, but listed by input index instead of strongest first."""
    return _gene(alphas, primitives, steps, k, strongest_first=False)


# --------------------------------------------------------------------------- architect_step


def architect_step_with_backward(model, alpha_optimizer, x_val, y_val):
    """Correct: loss.backward() (which also fills the weights' .grad, cleared by the weight step's zero_grad)."""
    alpha_optimizer.zero_grad()
    loss = F.cross_entropy(model(x_val), y_val)
    loss.backward()
    alpha_optimizer.step()
    return loss.item()


def architect_step_backward_inputs(model, alpha_optimizer, x_val, y_val):
    """Correct: backward limited to the alphas with inputs=, grads cleared by hand, nothing returned."""
    for a in model.arch_parameters():
        a.grad = None
    torch.autograd.backward(F.cross_entropy(model(x_val), y_val), inputs=model.arch_parameters())
    alpha_optimizer.step()


def architect_step_moves_weights(model, alpha_optimizer, x_val, y_val):
    """Wrong: one optimizer over every parameter, so the weights learn from the validation batch too."""
    everything = torch.optim.SGD(model.parameters(), lr=0.1)
    alpha_optimizer.zero_grad()
    everything.zero_grad()
    F.cross_entropy(model(x_val), y_val).backward()
    alpha_optimizer.step()
    everything.step()


def architect_step_without_zero_grad(model, alpha_optimizer, x_val, y_val):
    """Wrong: gradients accumulate across calls."""
    F.cross_entropy(model(x_val), y_val).backward()
    alpha_optimizer.step()


def architect_step_ascends(model, alpha_optimizer, x_val, y_val):
    """Wrong: the sign of the loss flipped (the alphas climb the validation loss)."""
    alpha_optimizer.zero_grad()
    (-F.cross_entropy(model(x_val), y_val)).backward()
    alpha_optimizer.step()


def architect_step_without_step(model, alpha_optimizer, x_val, y_val):
    """Wrong: the gradient is computed but the optimizer never steps."""
    alpha_optimizer.zero_grad()
    F.cross_entropy(model(x_val), y_val).backward()


def architect_step_in_eval_mode(model, alpha_optimizer, x_val, y_val):
    """Wrong: the loss computed in eval mode (BatchNorm's running statistics), the mode restored afterwards."""
    model.eval()
    alpha_optimizer.zero_grad()
    F.cross_entropy(model(x_val), y_val).backward()
    alpha_optimizer.step()
    model.train()


def architect_step_leaves_eval_mode(model, alpha_optimizer, x_val, y_val):
    """Wrong: switches the model to eval mode and leaves it there."""
    alpha_optimizer.zero_grad()
    F.cross_entropy(model(x_val), y_val).backward()
    alpha_optimizer.step()
    model.eval()


CORRECT = {
    "mixed_op": [MixedOpStacked, MixedOpEinsum],
    "derive_genotype": [genotype_in_numpy, genotype_with_topk, genotype_with_heap],
    "architect_step": [architect_step_with_backward, architect_step_backward_inputs],
}

WRONG = {
    "mixed_op": [
        (MixedOpUnweighted, "重みなしの和"),
        (MixedOpSoftmaxAgain, "もう一度 softmax"),
        (MixedOpArgmax, "Σ_k weights[k]"),
        (MixedOpPlainList, "nn.ModuleList"),
        (MixedOpDetached, "勾配が流れません"),
        (MixedOpMean, "Σ_k weights[k]"),
    ],
    "derive_genotype": [
        (genotype_chooses_none, "'none' が選ばれています"),
        (genotype_ranked_by_none, "'none' も含めた"),
        (genotype_over_the_cell, "セル全体"),
        (genotype_softmax_over_edges, "dim = 0"),
        (genotype_without_softmax, "softmax を通さずに"),
        (genotype_in_input_order, "入力の番号順"),
    ],
    "architect_step": [
        (architect_step_moves_weights, "重み"),
        (architect_step_without_zero_grad, "zero_grad"),
        (architect_step_ascends, "逆向き"),
        (architect_step_without_step, "step()"),
        (architect_step_in_eval_mode, "学習モード"),
        (architect_step_leaves_eval_mode, "評価モード"),
    ],
}
