"""Chapter 4's answer cases for the checker (used by tests/test_exercises.py).

``CORRECT``: answers written differently from the reference that must pass.
``WRONG``: the mistakes readers actually make (several from the seed listing), each with a
phrase the verdict must contain (or "" when any failure will do).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from solutions.lora import LoRALinear

# --------------------------------------------------------------------------- LoRALinear


class LoRAKeepsCopy(nn.Module):
    """Correct: F.linear and einsum, a Dropout module even at p = 0, merge keeps a copy of W to restore."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        base.weight.requires_grad = False
        if base.bias is not None:
            base.bias.requires_grad = False
        self.scaling = alpha / r
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        bound = 1 / math.sqrt(base.in_features)
        nn.init.uniform_(self.lora_A, -bound, bound)
        self.drop = nn.Dropout(dropout)
        self.saved = None

    def forward(self, x):
        y = F.linear(x, self.base.weight, self.base.bias)
        if self.saved is not None:
            return y
        low = torch.einsum("...i,ri->...r", self.drop(x), self.lora_A)
        return y + torch.einsum("...r,or->...o", low, self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self):
        if self.saved is None:
            self.saved = self.base.weight.clone()
            self.base.weight.add_(self.scaling * self.lora_B @ self.lora_A)

    @torch.no_grad()
    def unmerge(self):
        if self.saved is not None:
            self.base.weight.copy_(self.saved)
            self.saved = None


class _Reference(LoRALinear):
    pass


class ScalingIsAlpha(_Reference):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        self.scaling = alpha


class BRandom(_Reference):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))


class BaseLeftTrainable(_Reference):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        base.requires_grad_(True)


class MergeAddsAgain(_Reference):
    @torch.no_grad()
    def merge(self):
        self.base.weight += self.delta_weight()
        self.merged = True


class UnmergeDoesNothing(_Reference):
    def unmerge(self):
        self.merged = False


class DropoutOnBothPaths(_Reference):
    def forward(self, x):
        x = self.dropout(x)
        out = self.base(x)
        return out if self.merged else out + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


class SeedStyleNoBias(_Reference):
    """The seed listing's forward: F.linear(x, weight) without the bias."""

    def forward(self, x):
        out = F.linear(x, self.base.weight)
        return out if self.merged else out + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


class SeedStyleMerge(_Reference):
    """The seed listing's merge: adds ΔW, sets a flag that forward never reads."""

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling


class BothZero(_Reference):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        nn.init.zeros_(self.lora_A)


class AGaussian(_Reference):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        nn.init.normal_(self.lora_A)


class AlwaysFloat32(nn.Module):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    forward = LoRALinear.forward
    delta_weight = LoRALinear.delta_weight
    merge = LoRALinear.merge
    unmerge = LoRALinear.unmerge


class DropoutAfterB(_Reference):
    def forward(self, x):
        out = self.base(x)
        return out if self.merged else out + self.dropout(x @ self.lora_A.T @ self.lora_B.T) * self.scaling


# --------------------------------------------------------------------------- inject_lora


def inject_recursive(model, target_modules, r, alpha, dropout=0.0):
    """Correct: walks the children with their prefix, compares the dotted tail with a set."""
    targets = {target_modules} if isinstance(target_modules, str) else set(target_modules)
    model.requires_grad_(False)

    def visit(module, prefix):
        for child_name, child in list(module.named_children()):
            full = f"{prefix}{child_name}"
            parts = full.split(".")
            if isinstance(child, nn.Linear) and any(".".join(parts[-len(t.split(".")):]) == t for t in targets):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
            else:
                visit(child, full + ".")

    visit(model, "")
    return model


def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _inject_with(model, selects, make_layer, freeze="first"):
    """The loop every wrong injection below shares; each changes one of its parts.

    ``selects(name, module)``: which modules to replace; ``make_layer(module)``: the new layer;
    ``freeze``: "first" (correct), "after" (freeze the whole model once injected) or "never".
    """
    if freeze == "first":
        model.requires_grad_(False)
    for name, m in list(model.named_modules()):
        if selects(name, m):
            _replace(model, name, make_layer(m))
    if freeze == "after":
        model.requires_grad_(False)
    return model


def _linear_named(targets, match):
    return lambda name, m: isinstance(m, nn.Linear) and match(name, targets)


def _exact(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_substring(model, target_modules, r, alpha, dropout=0.0):
    """The seed's matching: `target in name`."""
    return _inject_with(model, _linear_named(target_modules, lambda n, ts: any(t in n for t in ts)),
                        lambda m: LoRALinear(m, r, alpha, dropout))


def inject_endswith(model, target_modules, r, alpha, dropout=0.0):
    return _inject_with(model, _linear_named(target_modules, lambda n, ts: n.endswith(tuple(ts))),
                        lambda m: LoRALinear(m, r, alpha, dropout))


def inject_then_freeze_all(model, target_modules, r, alpha, dropout=0.0):
    """The seed's order: inject, then freeze the whole model (LoRA included)."""
    return _inject_with(model, _linear_named(target_modules, _exact), lambda m: LoRALinear(m, r, alpha, dropout),
                        freeze="after")


def inject_freezes_only_targets(model, target_modules, r, alpha, dropout=0.0):
    return _inject_with(model, _linear_named(target_modules, _exact), lambda m: LoRALinear(m, r, alpha, dropout),
                        freeze="never")


def _weight_only_copy(m):
    fresh = nn.Linear(m.in_features, m.out_features, bias=False)
    fresh.weight.data = m.weight.data.clone()
    return fresh


def inject_seed_copy_weight_only(model, target_modules, r, alpha, dropout=0.0):
    """The seed's LoRALayer: a new layer without bias that copies only the weight."""
    return _inject_with(model, _linear_named(target_modules, _exact),
                        lambda m: LoRALinear(_weight_only_copy(m), r, alpha, dropout))


def inject_any_module(model, target_modules, r, alpha, dropout=0.0):
    return _inject_with(model, lambda name, m: bool(name) and _exact(name, target_modules),
                        lambda m: LoRALinear(m, r, alpha, dropout))


def inject_swaps_r_alpha(model, target_modules, r, alpha, dropout=0.0):
    return _inject_with(model, _linear_named(target_modules, _exact), lambda m: LoRALinear(m, alpha, r, dropout))


def inject_drops_dropout(model, target_modules, r, alpha, dropout=0.0):
    return _inject_with(model, _linear_named(target_modules, _exact), lambda m: LoRALinear(m, r, alpha))


# --------------------------------------------------------------------------- lora_state_dict


def state_from_state_dict(model):
    """Correct: model.state_dict() filtered by the key's last part, each value cloned."""
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def state_by_requires_grad(model):
    """The seed's filter: every parameter that requires grad."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def state_everything(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def state_shares_memory(model):
    return {n: p.data for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def state_short_names(model):
    """Names relative to the blocks (model.layers), not to the model: they load into nothing."""
    return {n: p.detach().clone() for n, p in model.layers.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def state_parameters_themselves(model):
    return {n: p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


CORRECT = {
    "lora_linear": [LoRAKeepsCopy],
    "inject_lora": [inject_recursive],
    "lora_state_dict": [state_from_state_dict],
}

# (wrong answer, a phrase the verdict must contain, or "" when any failure will do)
WRONG = {
    "lora_linear": [
        (ScalingIsAlpha, "alpha をそのまま"),
        (BRandom, "lora_B が 0 ではありません"),
        (BaseLeftTrainable, "requires_grad=True のまま"),
        (MergeAddsAgain, "2 回目の merge"),
        (UnmergeDoesNothing, "unmerge は base.weight から"),
        (DropoutOnBothPaths, "base の経路にも"),
        (SeedStyleNoBias, "バイアス"),
        (SeedStyleMerge, "2 回数える"),
        (BothZero, "どちらも 0"),
        (AGaussian, "範囲を超えて"),
        (AlwaysFloat32, "float64"),
        (DropoutAfterB, "A や B の出力には"),
    ],
    "inject_lora": [
        (inject_substring, "部分文字列"),
        (inject_endswith, "末尾の文字列だけ"),
        (inject_then_freeze_all, "1 つもありません"),
        (inject_freezes_only_targets, "LoRA 以外のパラメータ"),
        (inject_seed_copy_weight_only, "元の nn.Linear（同じ重みとバイアス）"),
        (inject_any_module, "isinstance(module, nn.Linear)"),
        (inject_swaps_r_alpha, "r と alpha"),
        (inject_drops_dropout, "dropout"),
    ],
    "lora_state_dict": [
        (state_by_requires_grad, "requires_grad"),
        (state_everything, "余分なキー"),
        (state_shares_memory, "同じメモリ"),
        (state_short_names, "先頭からの名前"),
        (state_parameters_themselves, ""),
    ],
}
