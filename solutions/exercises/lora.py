"""Chapter 4's exercises: their registrations and the tests that grade a reader's answer.

The tests judge an answer by what it does: the outputs before and after training the adapter,
merged and unmerged, the weights a merge leaves behind, which parameters still require grad,
which modules an injection replaced, and whether a saved adapter restores the outputs. Where a
test needs the adapter's matrices it finds them by the exercise's fixed names (``lora_A``,
``lora_B``, ``base``), never by how the answer computes with them.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from ..checker import CheckFailed, call_without_mutation, expect_close, expect_tensor, register
from ..lora import LoRALinear, inject_lora, lora_state_dict

CHAPTER = "04_lora"


def _linear(in_features=12, out_features=7, bias=True, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias).to(device=device, dtype=dtype)
    with torch.no_grad():
        if bias:
            layer.bias.normal_()  # a bias far from 0, so that a dropped bias shows
    return layer


def _build(cls, base, r, alpha, dropout=0.0):
    try:
        return cls(base, r, alpha, dropout)
    except TypeError as e:
        raise CheckFailed(f"LoRALinear(base, r, alpha, dropout) の形で作れませんでした: {e}") from None


def _adapter_matrices(layer, in_features, out_features, r):
    """(A, B) of a LoRA layer, checked to be trainable parameters of the fixed shapes."""
    for name, shape in (("lora_A", (r, in_features)), ("lora_B", (out_features, r))):
        p = getattr(layer, name, None)
        if not isinstance(p, nn.Parameter):
            raise CheckFailed(f"self.{name} が nn.Parameter ではありません（{type(p).__name__}）。"
                              f"nn.Parameter(...) で包んでください。名前は {name} に固定しています。")
        if tuple(p.shape) != shape:
            raise CheckFailed(f"{name} の形状は {shape} のはずですが {tuple(p.shape)} でした"
                              "（A は (r, in_features)、B は (out_features, r)）。")
        if not p.requires_grad:
            raise CheckFailed(f"{name} が requires_grad=False になっています。学習するのは LoRA の A と B です。")
    return layer.lora_A, layer.lora_B


def _randomize_B(layer, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        B = layer.lora_B
        B.copy_((torch.randn(B.shape, generator=g, dtype=torch.float64) * scale).to(B.dtype))


def _formula(base_weight, base_bias, A, B, scaling, x):
    """The LoRA output by the definition, in float64: x Wᵀ + b + (x Aᵀ Bᵀ)·scaling."""
    x, W, A, B = (t.detach().double() for t in (x, base_weight, A, B))
    out = x @ W.T + (x @ A.T @ B.T) * scaling
    return out + base_bias.detach().double() if base_bias is not None else out


# =======================================================================================
# lora_linear

lora_linear = register("lora_linear", "LoRA の層（LoRALinear）", chapter=CHAPTER, reference=LoRALinear)


@lora_linear.test("渡された nn.Linear を self.base として持って凍結し、lora_A (r, in)・lora_B (out, r) を学習する")
def _(Answer, reference):
    base = _linear()
    layer = _build(Answer, base, 4, 8)
    if getattr(layer, "base", None) is not base:
        raise CheckFailed("self.base が渡された nn.Linear そのものではありません。`self.base = base` として、"
                          "元の層（学習済みの重み）をそのまま持ってください。")
    frozen = [n for n, p in base.named_parameters() if p.requires_grad]
    if frozen:
        raise CheckFailed(f"base の {frozen} が requires_grad=True のままです。LoRALinear の中で "
                          "base のパラメータを凍結してください（requires_grad_(False)）。")
    _adapter_matrices(layer, 12, 7, 4)
    extra = [n for n, p in layer.named_parameters() if p.requires_grad and n not in ("lora_A", "lora_B")]
    if extra:
        raise CheckFailed(f"lora_A と lora_B のほかに学習するパラメータ {extra} があります。")


@lora_linear.test("scaling = alpha / r")
def _(Answer, reference):
    for r, alpha in ((4, 8), (8, 8), (16, 4)):
        layer = _build(Answer, _linear(), r, alpha)
        s = getattr(layer, "scaling", None)
        if not isinstance(s, (int, float)) and not (isinstance(s, torch.Tensor) and s.numel() == 1):
            raise CheckFailed("self.scaling（数）がありません。`self.scaling = alpha / r` としてください。")
        if not math.isclose(float(s), alpha / r, rel_tol=1e-6):
            hint = "alpha をそのまま使っていませんか。" if math.isclose(float(s), alpha) else ""
            raise CheckFailed(f"r={r}, alpha={alpha} のとき scaling は {alpha / r:g} のはずですが {float(s):g} でした。"
                              + hint)


@lora_linear.test("B は 0、A は nn.Linear と同じ Kaiming の一様分布 U(-1/√in, 1/√in) で初期化する")
def _(Answer, reference):
    in_f, out_f, r = 256, 10, 16
    layer = _build(Answer, _linear(in_f, out_f), r, 2 * r)
    A, B = _adapter_matrices(layer, in_f, out_f, r)
    if (B != 0).any():
        raise CheckFailed("lora_B が 0 ではありません。B を 0 にしておくと、作った直後の ΔW = BA が 0 になり、"
                          "学習は元のモデルとまったく同じ出力から始まります。")
    a = A.detach().double().flatten()
    if (a == 0).all():
        raise CheckFailed("lora_A も 0 になっています。A と B がどちらも 0 だと、どちらの勾配も 0 になり"
                          "（∂L/∂B は A を、∂L/∂A は B を含む）、学習がまったく進みません。"
                          "A は乱数で初期化してください。")
    bound = 1 / math.sqrt(in_f)
    if a.abs().max() > bound * (1 + 1e-5):
        raise CheckFailed(f"lora_A の値が ±1/√in_features = ±{bound:.4f} の範囲を超えています"
                          f"（最大 {a.abs().max():.4f}）。nn.init.kaiming_uniform_(A, a=math.sqrt(5)) を"
                          "使ってください（nn.Linear の重みと同じ初期化。原論文は A をガウス分布で初期化しますが、"
                          "peft と本書は nn.Linear と同じ一様分布を使います）。")
    # Kolmogorov–Smirnov statistic against U(-bound, bound) over r·in = 4096 values
    u = torch.sort((a + bound) / (2 * bound)).values
    n = u.numel()
    ks = torch.max(torch.maximum(torch.arange(1, n + 1, dtype=torch.float64) / n - u,
                                 u - torch.arange(n, dtype=torch.float64) / n)).item()
    if ks > 1.95 / math.sqrt(n):  # p ≈ 0.001
        raise CheckFailed(f"lora_A の値の分布が一様分布 U(-{bound:.4f}, {bound:.4f}) に見えません"
                          f"（KS 統計量 {ks:.3f}）。"
                          "nn.init.kaiming_uniform_(A, a=math.sqrt(5)) を使ってください。")


@lora_linear.test("出力が base(x) + (x Aᵀ Bᵀ)·scaling に一致する（B を 0 以外にして、バイアスの有無、3 次元の入力）")
def _(Answer, reference):
    for bias, shape in ((True, (3, 5, 12)), (False, (1, 12)), (True, (2, 1, 12))):
        base = _linear(bias=bias)
        W, b = base.weight.detach().clone(), (base.bias.detach().clone() if bias else None)
        layer = _build(Answer, base, 4, 8)
        A, _B = _adapter_matrices(layer, 12, 7, 4)
        x = torch.randn(shape)
        expect_close(call_without_mutation(layer, x), _formula(W, b, A, layer.lora_B, 2.0, x).float(),
                     "B = 0 のときの出力",
                     hint="B = 0 なら出力は元の nn.Linear と同じはずです。バイアスを落としていませんか。")
        _randomize_B(layer)
        out = call_without_mutation(layer, x)
        expect_close(out, _formula(W, b, A, layer.lora_B, 2.0, x).float(), f"B を乱数にしたときの出力（入力 {shape}）",
                     hint="x Aᵀ Bᵀ に scaling = alpha / r を掛けて、base(x) に足していますか。")


@lora_linear.test("dropout は LoRA の経路の入力 x だけにかける（base の経路にはかけない）")
def _(Answer, reference):
    base = _linear(16, 6, seed=2)
    layer = _build(Answer, base, 4, 4, 0.5)
    layer.train()
    x = torch.randn(300, 16)
    expect_close(layer(x), base(x), "B = 0・学習モード・dropout=0.5 の出力",
                 hint="dropout を base の経路にもかけていませんか。dropout は LoRA の経路の入力にだけかけます。")
    _randomize_B(layer)
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    eye = torch.eye(16).repeat(20, 1)[:300]  # one-hot rows: dropout keeps each row whole (×2) or zeroes it
    delta = (layer(eye) - base(eye)).detach().double()
    full = (eye.double() @ A.T @ B.T) * layer.scaling
    kept = torch.isclose(delta, 2 * full, atol=1e-5, rtol=1e-4).all(1)
    dropped = torch.isclose(delta, torch.zeros_like(delta), atol=1e-5).all(1)
    if not (kept | dropped).all():
        raise CheckFailed("dropout を入れた LoRA の経路が、dropout(x) Aᵀ Bᵀ · scaling の形になっていません。"
                          "dropout は x（LoRA の経路の入力）にかけ、A や B の出力にはかけないでください。")
    if kept.all() or dropped.all():
        raise CheckFailed("学習モードで dropout=0.5 なのに、LoRA の経路に dropout がかかっていません。"
                          "nn.Dropout(dropout) を作って、LoRA の経路の入力にかけてください。")
    layer.eval()
    expect_close(layer(eye), _formula(base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scaling, eye).float(),
                 "評価モード（model.eval()）の出力", hint="評価モードでは dropout は何もしません。")


@lora_linear.test("merge() で出力が変わらず、base.weight が B A·scaling だけ変わる。2 回目の merge は何もしない")
def _(Answer, reference):
    base = _linear(12, 7, seed=3)
    W0 = base.weight.detach().clone()
    layer = _build(Answer, base, 4, 16)
    _randomize_B(layer)
    x = torch.randn(4, 12)
    before = layer(x).detach()
    expected_W = W0 + (layer.lora_B @ layer.lora_A).detach() * layer.scaling
    for k in (1, 2):
        if not callable(getattr(layer, "merge", None)):
            raise CheckFailed("merge() メソッドがありません。")
        layer.merge()
        expect_close(layer.base.weight.detach(), expected_W, f"{k} 回目の merge() のあとの base.weight",
                     atol=1e-6, hint="merge は base.weight に ΔW = B A·scaling を 1 回だけ足します。"
                     + ("2 回目の merge でもう一度足していませんか。merge 済みかどうかを覚えておいてください。"
                        if k == 2 else ""))
        expect_close(layer(x), before, f"{k} 回目の merge() のあとの出力", atol=1e-5,
                     hint="merge したあとは、forward で LoRA の経路を足してはいけません"
                          "（ΔW を 2 回数えることになります）。")


@lora_linear.test("unmerge() で base.weight が元に戻り、出力も変わらない。2 回目の unmerge は何もしない")
def _(Answer, reference):
    base = _linear(12, 7, seed=4)
    W0 = base.weight.detach().clone()
    layer = _build(Answer, base, 2, 4)
    _randomize_B(layer)
    x = torch.randn(4, 12)
    before = layer(x).detach()
    if not callable(getattr(layer, "unmerge", None)):
        raise CheckFailed("unmerge() メソッドがありません。")
    layer.unmerge()  # never merged: nothing to undo
    expect_close(layer.base.weight.detach(), W0, "merge する前に unmerge() したあとの base.weight", atol=1e-6,
                 hint="merge していないときの unmerge は何もしないはずです。")
    layer.merge()
    for k in (1, 2):
        layer.unmerge()
        expect_close(layer.base.weight.detach(), W0, f"merge → unmerge ×{k} のあとの base.weight", atol=1e-6,
                     hint="unmerge は base.weight から ΔW を引いて元に戻します。" if k == 1 else
                     "2 回目の unmerge でもう一度引いていませんか。")
        expect_close(layer(x), before, f"merge → unmerge ×{k} のあとの出力", atol=1e-5,
                     hint="unmerge したあとは forward で LoRA の経路をまた足す必要があります。")


@lora_linear.test("学習すると B が 0 から動き、勾配は A と B にだけ流れる")
def _(Answer, reference):
    base = _linear(12, 7, seed=5)
    layer = _build(Answer, base, 4, 8)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(16, 12), torch.randn(16, 7)
    for _ in range(2):
        opt.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        opt.step()
    if base.weight.grad is not None and base.weight.grad.abs().sum() > 0:
        raise CheckFailed("base.weight に勾配が流れています。base は凍結してください。")
    if (layer.lora_B == 0).all():
        raise CheckFailed("2 ステップ学習しても lora_B が 0 のままです。forward で lora_B を使っていますか。")


@lora_linear.test("base の dtype（float64）に合わせて A と B を作る")
def _(Answer, reference):
    base = _linear(dtype=torch.float64)
    layer = _build(Answer, base, 4, 8)
    for name in ("lora_A", "lora_B"):
        p = getattr(layer, name, None)
        if isinstance(p, torch.Tensor) and p.dtype != torch.float64:
            raise CheckFailed(f"base が float64 なのに {name} が {p.dtype} です。実際のモデルは bfloat16 や float16 で"
                              "読み込むことが多いので、dtype=base.weight.dtype, device=base.weight.device で"
                              "作ってください。")
    x = torch.randn(3, 12, dtype=torch.float64)
    _randomize_B(layer)
    out = expect_tensor(layer(x), "float64 の入力に対する出力", dtype=torch.float64)
    expect_close(out, _formula(base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scaling, x),
                 "float64 での出力", atol=1e-10, rtol=1e-9)


@lora_linear.gpu_test
def _(Answer, reference, device):
    base = _linear(device=device)
    layer = _build(Answer, base, 4, 8)
    for name in ("lora_A", "lora_B"):
        if getattr(layer, name).device.type != "cuda":
            raise CheckFailed(f"base が GPU にあるのに {name} が {getattr(layer, name).device} にあります。"
                              "device=base.weight.device で作ってください。")
    _randomize_B(layer)
    x = torch.randn(3, 12, device=device)
    expect_close(layer(x).cpu(), _formula(base.weight.cpu(), base.bias.cpu(), layer.lora_A.cpu(), layer.lora_B.cpu(),
                                          layer.scaling, x.cpu()).float(), "GPU での出力")


# =======================================================================================
# inject_lora


class _Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):  # (B, T, d): causal softmax attention, one head
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        T = x.shape[1]
        scores = (q @ k.transpose(1, 2)) / math.sqrt(x.shape[-1])
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return self.o_proj(scores.softmax(-1) @ v)


class _MoEFeedForward(nn.Module):
    """A Qwen2-MoE-like feed-forward: a router named ``gate`` beside ``gate_proj`` and ``shared_expert_gate``."""

    def __init__(self, d, h):
        super().__init__()
        self.gate = nn.Linear(d, 2, bias=False)  # the router
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)
        self.shared_expert_gate = nn.Linear(d, 1, bias=True)

    def forward(self, x):
        mix = self.gate(x).softmax(-1)[..., :1]
        y = self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return y * mix + torch.sigmoid(self.shared_expert_gate(x)) * x


class _Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn, self.mlp = _Attention(d), _MoEFeedForward(d, h)

    def forward(self, x):
        x = x + self.self_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _TinyLM(nn.Module):
    """Names like a Hugging Face decoder: layers.0.self_attn.q_proj, layers.1.mlp.gate, lm_head, ..."""

    def __init__(self, vocab=11, d=16, h=24, n_layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([_Block(d, h) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=True)

    def forward(self, idx):  # (B, T) -> (B, T, vocab)
        x = self.embed_tokens(idx)
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x))


def _tiny_lm(seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = _TinyLM().to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # LayerNorm and biases away from their initial values
    return model


def _inject(fn, model, targets, r=4, alpha=8, dropout=0.0):
    original = dict(model.named_modules())
    try:
        out = fn(model, targets, r, alpha, dropout)
    except TypeError as e:
        raise CheckFailed(f"inject_lora(model, target_modules, r, alpha, dropout) の形で呼べませんでした: {e}"
                          ) from None
    if out is not model:
        raise CheckFailed("inject_lora はモデルをその場で書き換え、同じモデルを返してください"
                          f"（{type(out).__name__} 型の別の値が返りました）。")
    return original


def _adapted(model):
    """Qualified names of the modules that carry an adapter (a lora_A and a lora_B parameter)."""
    return {n for n, m in model.named_modules()
            if all(isinstance(getattr(m, k, None), torch.Tensor) for k in ("lora_A", "lora_B"))}


def _expect_adapted(model, expected: set[str], targets):
    got = _adapted(model)
    if got == expected:
        return
    extra, missing = sorted(got - expected), sorted(expected - got)
    msg = f"target_modules={targets} で LoRA に置き換わった層が違います。"
    if extra:
        msg += f" 置き換えるべきでない層: {extra}。"
        if any(any(t in n for t in targets) and not n.endswith(tuple(targets)) for n in extra):
            msg += "部分文字列（`target in name`）で判定していませんか。それでは gate が gate_proj にも一致します。"
        elif any(n.endswith(tuple(targets)) for n in extra):
            msg += ("名前の末尾の文字列だけで判定していませんか。peft と同じく、名前が target と等しいか、"
                    "「.」+ target で終わる（ピリオドで区切った末尾の部分が一致する）ときだけ置き換えます。")
    if missing:
        msg += f" 置き換わっていない層: {missing}。"
        if any("." in t for t in targets):
            msg += (f"target_modules={targets} のようにピリオドを含む名前は、モジュールの名前の末尾の数段と比べます。"
                    "名前の最後の部分だけで照合していませんか。")
    raise CheckFailed(msg)


inject = register("inject_lora", "名前で選んだ層への LoRA の注入（inject_lora）", chapter=CHAPTER,
                  reference=inject_lora)


@inject.test("target_modules に一致する nn.Linear だけが LoRA の層に置き換わり、同じモデルが返る")
def _(answer, reference):
    model = _tiny_lm()
    targets = ["q_proj", "v_proj"]
    _inject(answer, model, targets)
    _expect_adapted(model, {f"layers.{i}.self_attn.{t}" for i in range(2) for t in targets}, targets)


@inject.test("名前はピリオドで区切った末尾で照合する（gate は gate_proj や shared_expert_gate に一致しない）")
def _(answer, reference):
    model = _tiny_lm()
    _inject(answer, model, ["gate"])
    _expect_adapted(model, {"layers.0.mlp.gate", "layers.1.mlp.gate"}, ["gate"])
    model = _tiny_lm()
    _inject(answer, model, ["mlp.up_proj", "lm_head"])
    _expect_adapted(model, {"layers.0.mlp.up_proj", "layers.1.mlp.up_proj", "lm_head"}, ["mlp.up_proj", "lm_head"])


@inject.test("nn.Linear でない層（LayerNorm やブロック全体）は、名前が一致しても置き換えない")
def _(answer, reference):
    model = _tiny_lm()
    try:
        _inject(answer, model, ["norm1", "mlp", "o_proj"])
    except AttributeError as e:
        if "in_features" in str(e) or "weight" in str(e):
            raise CheckFailed(f"nn.Linear でない層まで LoRALinear で包もうとしていませんか（{e}）。"
                              "isinstance(module, nn.Linear) で確かめてから置き換えてください。") from None
        raise
    _expect_adapted(model, {"layers.0.self_attn.o_proj", "layers.1.self_attn.o_proj"}, ["norm1", "mlp", "o_proj"])
    if not isinstance(model.layers[0].norm1, nn.LayerNorm):
        raise CheckFailed("LayerNorm が置き換えられています。置き換えるのは nn.Linear だけです。")


@inject.test("学習するパラメータは LoRA の A と B だけ（埋め込み・正規化・バイアス・出力層も凍結）")
def _(answer, reference):
    model = _tiny_lm()
    _inject(answer, model, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise CheckFailed("学習するパラメータが 1 つもありません。LoRA の層を入れたあとでモデル全体を凍結していませんか"
                          "（LoRA の A と B まで凍ってしまいます）。先に凍結してから LoRA の層を入れてください。")
    wrong = [n for n in trainable if n.rsplit(".", 1)[-1] not in ("lora_A", "lora_B")]
    if wrong:
        raise CheckFailed(f"LoRA 以外のパラメータが学習する設定のままです: {wrong[:4]}（全 {len(wrong)} 個）。"
                          "置き換えた層だけでなく、モデル全体を凍結してください。")
    expected = 2 * 5 * 2  # 2 blocks × 5 targets × (A, B)
    if len(trainable) != expected:
        raise CheckFailed(f"学習するパラメータは {expected} 個（層ごとに A と B）のはずですが "
                          f"{len(trainable)} 個でした。")


@inject.test("注入した直後の出力は元のモデルと同じで、元の重みは書き換わらない")
def _(answer, reference):
    model = _tiny_lm()
    idx = torch.randint(11, (3, 6))
    before = model(idx).detach()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    _inject(answer, model, ["q_proj", "gate_proj", "lm_head"])
    for name in _adapted(model):
        base = getattr(model.get_submodule(name), "base", None)
        W, b = weights[name + ".weight"], weights.get(name + ".bias")
        if not isinstance(base, nn.Linear) or not torch.equal(base.weight, W) or (
                b is not None and (base.bias is None or not torch.equal(base.bias, b))):
            raise CheckFailed(f"{name} の base が、元の nn.Linear（同じ重みとバイアス）になっていません。"
                              "元の層をそのまま LoRALinear(元の層, r, alpha, dropout) に渡してください。")
    expect_close(model(idx), before, "注入した直後の出力", hint="B を 0 で初期化していれば、出力は変わらないはずです。")


@inject.test("r・alpha が各層に渡り、B を動かすと各層の出力が base(x) + (x Aᵀ Bᵀ)·alpha/r になる")
def _(answer, reference):
    model = _tiny_lm()
    originals = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = ["k_proj", "up_proj", "shared_expert_gate"]
    _inject(answer, model, targets, r=3, alpha=12)
    for i, name in enumerate(sorted(_adapted(model))):
        layer = model.get_submodule(name)
        W, b = originals[name]
        if isinstance(getattr(layer, "lora_A", None), torch.Tensor) and layer.lora_A.shape[0] == 12:
            raise CheckFailed(f"{name} の lora_A の行数が alpha（12）になっています。r と alpha を入れ替えていませんか"
                              "（LoRALinear(base, r, alpha, dropout) の順です）。")
        A, B = _adapter_matrices(layer, W.shape[1], W.shape[0], 3)
        _randomize_B(layer, seed=10 + i)
        x = torch.randn(2, 5, W.shape[1])
        expect_close(layer(x), _formula(W, b, A, B, 12 / 3, x).float(), f"注入した層 {name} の出力",
                     hint="r と alpha を LoRA の層にそのまま渡していますか（scaling = alpha / r = 4）。")


@inject.test("dropout が各層に渡る（学習モードで B を動かすと出力がばらつく）")
def _(answer, reference):
    model = _tiny_lm()
    _inject(answer, model, ["v_proj"], r=2, alpha=2, dropout=0.5)
    layer = model.get_submodule("layers.0.self_attn.v_proj")
    _randomize_B(layer)
    layer.train()
    x = torch.randn(4, 16)
    if torch.allclose(layer(x), layer(x)):
        raise CheckFailed("dropout=0.5 を渡したのに、学習モードで同じ入力への出力が毎回同じです。"
                          "dropout を LoRA の層に渡してください。")


@inject.gpu_test
def _(answer, reference, device):
    model = _tiny_lm(device=device)
    _inject(answer, model, ["q_proj"])
    for name in _adapted(model):
        if model.get_submodule(name).lora_A.device.type != "cuda":
            raise CheckFailed(f"モデルが GPU にあるのに、{name} の LoRA の重みが GPU にありません。")
    idx = torch.randint(11, (2, 5), device=device)
    model(idx)


# =======================================================================================
# lora_state_dict

adapter_state = register("lora_state_dict", "アダプタの重みだけを取り出す（lora_state_dict）", chapter=CHAPTER,
                         reference=lora_state_dict)


def _injected(seed=0, targets=("q_proj", "v_proj", "down_proj")):
    model = inject_lora(_tiny_lm(seed), list(targets), r=4, alpha=8)
    for i, name in enumerate(sorted(_adapted(model))):
        _randomize_B(model.get_submodule(name), seed=20 + i)
    return model


def _call_state(fn, model):
    state = fn(model)
    if not isinstance(state, dict):
        raise CheckFailed(f"辞書（名前 → テンソル）を返してください（{type(state).__name__} 型の値が返りました）。")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckFailed(f"キーは名前の文字列、値はテンソルにしてください（{k!r}: {type(v).__name__}）。")
    return state


def _expected_keys(model):
    return {k for k in model.state_dict() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


@adapter_state.test("キーは model.state_dict() と同じ名前の lora_A・lora_B だけで、値も同じ")
def _(answer, reference):
    model = _injected()
    state = _call_state(answer, model)
    expected = _expected_keys(model)
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        msg = "返した辞書のキーが、アダプタの重みの名前と一致しません。"
        if extra:
            msg += f" 余分なキー: {extra[:3]}（{len(extra)} 個）。"
            if any(k.rsplit(".", 1)[-1] not in ("lora_A", "lora_B") for k in extra):
                msg += "base の重みまで入れていませんか。"
        if missing:
            msg += f" 足りないキー: {missing[:3]}（{len(missing)} 個）。"
            if any("lora_" in k for k in state):
                msg += "キーは model.state_dict() と同じ、モデルの先頭からの名前にしてください。"
        raise CheckFailed(msg)
    full = model.state_dict()
    for k in expected:
        expect_close(state[k], full[k], f"キー {k} の値", atol=0, rtol=0)


@adapter_state.test("requires_grad に頼らない（モデル全体を凍結しても、出力層も学習する設定でも同じキー）")
def _(answer, reference):
    model = _injected()
    expected = _expected_keys(model)
    model.requires_grad_(False)  # inference: everything frozen
    if set(_call_state(answer, model)) != expected:
        raise CheckFailed("モデル全体を凍結（requires_grad_(False)）すると、返すキーが変わりました。"
                          "requires_grad で選んでいませんか。"
                          "推論のために凍結したモデルからも、アダプタは取り出せる必要があります。名前で選んでください。")
    model.lm_head.weight.requires_grad_(True)  # a head trained beside the adapter
    for n, m in model.named_modules():
        if n in _adapted(model):
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    if set(_call_state(answer, model)) != expected:
        raise CheckFailed("出力層も学習する設定にすると、出力層の重みまで返りました。requires_grad ではなく、"
                          "名前（lora_A・lora_B）で選んでください。")


@adapter_state.test("値はモデルから切り離したコピー（このあと学習が進んでも、取り出した値は変わらない）")
def _(answer, reference):
    model = _injected()
    state = _call_state(answer, model)
    snapshot = {k: v.detach().clone() for k, v in state.items()}
    with torch.no_grad():
        for name in _adapted(model):
            model.get_submodule(name).lora_B.add_(1.0)  # a training step moves B in place
    changed = [k for k in state if not torch.equal(state[k], snapshot[k])]
    if changed:
        raise CheckFailed(f"モデルの B を書き換えると、取り出した値 {changed[:2]} も変わりました。"
                          "state_dict() や .data は重みと同じメモリを指します。.detach().clone() でコピーしてください"
                          "（学習中に「いちばん良かったときのアダプタ」を取っておくときに、このままでは上書きされます）。")
    if any(v.requires_grad for v in state.values()):
        raise CheckFailed("取り出した値が requires_grad=True のままです。"
                          ".detach() で計算グラフから切り離してください。")


@adapter_state.test("safetensors で保存し、新しく作ったモデルに読み込むと出力が一致する")
def _(answer, reference):
    from safetensors.torch import load_file, save_file

    from ..lora import load_lora_state_dict

    model = _injected(seed=0)
    idx = torch.randint(11, (2, 7))
    expected = model(idx).detach()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.safetensors"
        try:
            save_file(_call_state(answer, model), str(path))
        except Exception as e:  # safetensors' own message says what it refused
            raise CheckFailed(f"safetensors の save_file で保存できませんでした: {e}") from None
        fresh = inject_lora(_tiny_lm(seed=0), ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
        load_lora_state_dict(fresh, load_file(str(path)))
    expect_close(fresh(idx), expected, "読み込んだモデルの出力")


@adapter_state.gpu_test
def _(answer, reference, device):
    model = _injected().to(device)
    state = _call_state(answer, model)
    if set(state) != _expected_keys(model):
        raise CheckFailed("GPU 上のモデルで、返すキーが変わりました。")
