"""Chapter 6's answer cases for the checker (used by tests/test_exercises.py).

``CORRECT``: answers written differently from the reference that must pass.
``WRONG``: the mistakes readers actually make, each with a phrase the verdict must contain.
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from solutions.rainbow import NoisyLinear, SumTree

# --------------------------------------------------------------------------- sum_tree


class FenwickSumTree:
    """Correct: a Fenwick (binary indexed) tree, prefix sums and a binary-lifting search, both O(log n)."""

    def __init__(self, capacity):
        self.n = capacity
        self.bit = [0.0] * (capacity + 1)
        self.values = [0.0] * capacity
        self.log = 1 << capacity.bit_length()

    def update(self, index, priority):
        delta = priority - self.values[index]
        self.values[index] = priority
        i = index + 1
        while i <= self.n:
            self.bit[i] += delta
            i += i & -i

    def total(self):
        s, i = 0.0, self.n
        while i > 0:
            s += self.bit[i]
            i -= i & -i
        return s

    def find(self, value):
        pos, step = 0, self.log
        while step:
            nxt = pos + step
            if nxt <= self.n and self.bit[nxt] <= value:
                pos, value = nxt, value - self.bit[nxt]
            step >>= 1
        while pos < self.n - 1 and self.values[pos] <= 0:      # skip empty leaves reached by rounding
            pos += 1
        return pos


class HeapSumTree:
    """Correct: the common layout of 2·capacity − 1 nodes with the leaves at capacity − 1 + index and the
    root at 0. When the capacity is not a power of two the leaves cover [0, total) out of index order
    (the deepest level first), which is still sampling in proportion to the priorities."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.nodes = np.zeros(2 * capacity - 1)

    def update(self, index, priority):
        node = index + self.capacity - 1
        change = priority - self.nodes[node]
        self.nodes[node] = priority
        while node > 0:                                    # add the change to every ancestor
            node = (node - 1) // 2
            self.nodes[node] += change

    def total(self):
        return float(self.nodes[0])

    def find(self, value):
        node = 0
        while 2 * node + 1 < len(self.nodes):
            left, right = 2 * node + 1, 2 * node + 2
            if value < self.nodes[left] or self.nodes[right] <= 0:
                node = left
            else:
                value -= self.nodes[left]
                node = right
        return node - (self.capacity - 1)


class TreeWithoutPropagation(SumTree):
    """Wrong: the leaf is written but the parents are not updated."""

    def update(self, index, priority):
        self.tree[index + self.n_leaves] = priority


class TreeTotalFromWrongNode(SumTree):
    """Wrong: total() reads tree[0], the unused slot of the 1-based layout, instead of the root tree[1]."""

    def total(self):
        return float(self.tree[0])


class TreeReturnsNodePosition(SumTree):
    """Wrong: returns the leaf's position in the array instead of its number."""

    def find(self, value):
        return super().find(value) + self.n_leaves


class TreeFindsWrongWay(SumTree):
    """Wrong: goes right when value < left."""

    def find(self, value):
        i = 1
        while i < self.n_leaves:
            left = self.tree[2 * i]
            if value >= left:                                   # the comparison turned around
                i = 2 * i
            else:
                value -= left
                i = 2 * i + 1
        return min(i - self.n_leaves, self.capacity - 1)


class TreeForgetsToSubtract(SumTree):
    """Wrong: goes right without subtracting the left sum."""

    def find(self, value):
        i = 1
        while i < self.n_leaves:
            left = self.tree[2 * i]
            i = 2 * i if value < left else 2 * i + 1
        return min(i - self.n_leaves, self.capacity - 1)


class IterativeSegmentTree:
    """Correct: 2·capacity nodes, the leaves at capacity + index, node i's children 2i and 2i + 1. For any
    capacity every node below capacity has both children in range, so the walk from the root reaches each
    leaf once; when the capacity is not a power of two the leaves are out of index order, which is fine."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.tree = np.zeros(2 * capacity)

    def update(self, index, priority):
        i = index + self.capacity
        self.tree[i] = priority
        i //= 2
        while i >= 1:
            self.tree[i] = self.tree[2 * i] + self.tree[2 * i + 1]
            i //= 2

    def total(self):
        return float(self.tree[1])

    def find(self, value):
        i = 1
        while i < self.capacity:
            left = self.tree[2 * i]
            if value < left:
                i = 2 * i
            else:
                value -= left
                i = 2 * i + 1
        return i - self.capacity


class TreeRoundsCapacityDown(SumTree):
    """Wrong: rounds the leaf layer down to a power of two, so the last indices fall off the tree."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.n_leaves = 1 << (capacity.bit_length() - 1)
        self.tree = np.zeros(2 * self.n_leaves)


class LinearScan:
    """Wrong (too slow): a list of priorities scanned from the start, O(N) per find and total."""

    def __init__(self, capacity):
        self.p = np.zeros(capacity)

    def update(self, index, priority):
        self.p[index] = priority

    def total(self):
        return float(self.p.sum())

    def find(self, value):
        return int(np.searchsorted(np.cumsum(self.p), value, side="right"))


# --------------------------------------------------------------------------- project_distribution


def _positions(next_probs, rewards, dones, support, gamma):
    """b = (clip(r + γz, v_min, v_max) - v_min) / Δz, and its floor and ceiling (shared by the cases below)."""
    v_min, v_max = support[0].item(), support[-1].item()
    dz = (v_max - v_min) / (support.numel() - 1)
    tz = (rewards[:, None] + gamma * (~dones.bool()).to(next_probs.dtype)[:, None] * support[None]).clamp(v_min, v_max)
    b = (tz - v_min) / dz
    return b, b.floor().long(), b.ceil().long()


def projection_with_nudge(next_probs, rewards, dones, support, gamma):
    """Correct: the common trick of moving l or u by one when b lands on an atom, index_add_ per row."""
    n = support.numel()
    b, lo, up = _positions(next_probs, rewards, dones, support, gamma)
    lo[(up > 0) & (lo == up)] -= 1
    up[(lo < n - 1) & (lo == up)] += 1
    out = torch.zeros_like(next_probs)
    for i in range(next_probs.shape[0]):
        out[i].index_add_(0, lo[i], next_probs[i] * (up[i].to(b.dtype) - b[i]))
        out[i].index_add_(0, up[i], next_probs[i] * (b[i] - lo[i].to(b.dtype)))
    return out


def projection_by_triangles(next_probs, rewards, dones, support, gamma):
    """Correct: the closed form of Rowland et al. (2018), each target spread over the atoms by the
    triangle kernel clamp(1 - |Tz_j - z_i| / Δz, 0, 1); a dense (B, N, N) product instead of an index."""
    v_min, v_max = support[0], support[-1]
    dz = (v_max - v_min) / (support.numel() - 1)
    keep = 1.0 - dones.to(next_probs.dtype)
    tz = (rewards[:, None] + gamma * keep[:, None] * support[None]).clamp(v_min, v_max)      # (B, N)
    kernel = (1 - (tz[:, None, :] - support[None, :, None]).abs() / dz).clamp(0, 1)          # (B, N_i, N_j)
    return torch.einsum("bij,bj->bi", kernel, next_probs)


def projection_drops_exact_atoms(next_probs, rewards, dones, support, gamma):
    """Wrong: (u - b) and (b - l) are both 0 when b is an integer, so that mass disappears."""
    b, lo, up = _positions(next_probs, rewards, dones, support, gamma)
    out = torch.zeros_like(next_probs)
    out.scatter_add_(1, lo, next_probs * (up.to(b.dtype) - b))
    out.scatter_add_(1, up, next_probs * (b - lo.to(b.dtype)))
    return out


def projection_ignores_dones(next_probs, rewards, dones, support, gamma):
    """Wrong: bootstraps from the next state also after termination."""
    return projection_with_nudge(next_probs, rewards, torch.zeros_like(dones), support, gamma)


def projection_without_clipping(next_probs, rewards, dones, support, gamma):
    """Wrong: targets outside [v_min, v_max] are not clipped; their mass is dropped."""
    n = support.numel()
    v_min, v_max = support[0].item(), support[-1].item()
    dz = (v_max - v_min) / (n - 1)
    tz = rewards[:, None] + gamma * (~dones.bool()).to(next_probs.dtype)[:, None] * support[None]
    b = (tz - v_min) / dz
    out = torch.zeros_like(next_probs)
    for i in range(b.shape[0]):
        for j in range(n):
            lo, up = math.floor(b[i, j]), math.ceil(b[i, j])
            if 0 <= lo <= n - 1 and 0 <= up <= n - 1:
                if lo == up:
                    out[i, lo] += next_probs[i, j]
                else:
                    out[i, lo] += next_probs[i, j] * (up - b[i, j])
                    out[i, up] += next_probs[i, j] * (b[i, j] - lo)
    return out


# --------------------------------------------------------------------------- noisy_linear


class NoisyWithSeparateTerms(nn.Module):
    """Correct: noise kept as the two factors; the forward adds σ⊙ε as separate matrix products."""

    def __init__(self, in_features, out_features, std_init=0.5):
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.weight_sigma = nn.Parameter(torch.full((out_features, in_features), std_init * bound))
        self.bias_mu = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        self.bias_sigma = nn.Parameter(torch.full((out_features,), std_init * bound))
        self.register_buffer("weight_epsilon", torch.zeros(out_features, in_features))
        self.register_buffer("bias_epsilon", torch.zeros(out_features))
        self.in_features, self.out_features = in_features, out_features
        self.reset_noise()

    def reset_noise(self):
        def f(n):
            x = torch.randn(n)
            return x.sign() * x.abs().sqrt()

        e_in, e_out = f(self.in_features), f(self.out_features)
        self.weight_epsilon.copy_(torch.ger(e_out, e_in))
        self.bias_epsilon.copy_(e_out)

    def forward(self, x):
        y = F.linear(x, self.weight_mu, self.bias_mu)
        if self.training:
            y = y + F.linear(x, self.weight_sigma * self.weight_epsilon, self.bias_sigma * self.bias_epsilon)
        return y


class NoisyIndependent(NoisyLinear):
    """Wrong: independent noise for every weight (not factorised)."""

    @torch.no_grad()
    def reset_noise(self):
        self.weight_epsilon.normal_()
        self.bias_epsilon.normal_()


class NoisySigmaNotScaled(NoisyLinear):
    """Wrong: σ initialised to std_init instead of std_init / √in."""

    def __init__(self, in_features, out_features, std_init=0.5):
        super().__init__(in_features, out_features, std_init)
        with torch.no_grad():
            self.weight_sigma.fill_(std_init)
            self.bias_sigma.fill_(std_init)


class NoisyInEval(NoisyLinear):
    """Wrong: the noise is used in eval mode too."""

    def forward(self, x):
        return F.linear(x, self.weight_mu + self.weight_sigma * self.weight_epsilon,
                        self.bias_mu + self.bias_sigma * self.bias_epsilon)


class NoisyWithoutF(NoisyLinear):
    """Wrong: the factors are plain Gaussians, without f(x) = sign(x)·√|x|."""

    @torch.no_grad()
    def reset_noise(self):
        e_in, e_out = torch.randn(self.in_features), torch.randn(self.out_features)
        self.weight_epsilon.copy_(torch.outer(e_out, e_in))
        self.bias_epsilon.copy_(e_out)


class NoisyBiasOwnNoise(NoisyLinear):
    """Wrong: the bias gets noise of its own instead of f(ε_out)."""

    @torch.no_grad()
    def reset_noise(self):
        super().reset_noise()
        x = torch.randn(self.out_features)
        self.bias_epsilon.copy_(x.sign() * x.abs().sqrt())


CORRECT = {
    "sum_tree": [FenwickSumTree, HeapSumTree, IterativeSegmentTree],
    "project_distribution": [projection_with_nudge, projection_by_triangles],
    "noisy_linear": [NoisyWithSeparateTerms],
}

WRONG = {
    "sum_tree": [
        (TreeWithoutPropagation, "根まで"),
        (TreeTotalFromWrongNode, "total()"),
        (TreeReturnsNodePosition, "葉の番号"),
        (TreeFindsWrongWay, "find("),
        (TreeForgetsToSubtract, "左の子の和を引きます"),
        (TreeRoundsCapacityDown, "2 のべき乗でなくても"),
        (LinearScan, "O(log 容量)"),
    ],
    "project_distribution": [
        (projection_drops_exact_atoms, "アトムの上に乗る"),
        (projection_ignores_dones, "終了"),
        (projection_without_clipping, "和が 1 になりません"),
    ],
    "noisy_linear": [
        (NoisyIndependent, "階数が 1 ではありません"),
        (NoisySigmaNotScaled, "std_init をそのまま"),
        (NoisyInEval, "評価モード"),
        (NoisyWithoutF, "E|x|"),
        (NoisyBiasOwnNoise, "f(ε_out) と一致しません"),
    ],
}
