"""Chapter 4: LoRA from scratch, injected into a Hugging Face model, checked against peft.

The reference answers of the chapter's exercises (the LoRA layer, injection by module name,
the adapter's state dict), loading an adapter back into a freshly loaded base, merging every
adapter into plain ``nn.Linear`` layers, the arithmetic of parameters and optimizer state for a
real model size, and the lab: a character tokenizer, two generated arithmetic tasks, a small
Llama built from a config, its training loop and the answer accuracy. The exercises' tests live
in ``solutions/exercises/lora.py``.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# =======================================================================================
# Reference answers


class LoRALinear(nn.Module):
    """凍結した nn.Linear に低ランクの更新 ΔW = (alpha / r)・B A を足す層です。

    出力は base(x) + dropout(x) Aᵀ Bᵀ · (alpha / r)。A は nn.Linear と同じ Kaiming の一様分布、
    B は 0 で初期化するので、作った直後の出力は base と同じです。
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"r は 1 以上にしてください（r={r}）")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)  # 元の重みとバイアスは凍結
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        w = base.weight  # (out_features, in_features)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear の重みと同じ: U(-1/√in, 1/√in)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:  # (out_features, in_features)
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x):  # (..., in_features) -> (..., out_features)
        out = self.base(x)
        if self.merged:  # ΔW はもう base.weight に入っている
            return out
        return out + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling  # (..., r) を経由

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def name_matches(name: str, targets) -> bool:
    """名前がどれかの target と一致するか、「.target」で終わるとき True（peft と同じ規則）。"""
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, target_modules, r: int, alpha: float, dropout: float = 0.0) -> nn.Module:
    """名前が target_modules のどれかで終わる nn.Linear を LoRALinear に置き換え、ほかをすべて凍結します。"""
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    for p in model.parameters():
        p.requires_grad_(False)  # 先に全体を凍結し、そのあとで LoRA の層を作る（順番が逆だと LoRA まで凍る）
    targets = [(name, m) for name, m in model.named_modules()  # 置き換える前に全部列挙する
               if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in target_modules)]
    if not targets:
        raise ValueError(f"target_modules={list(target_modules)} に一致する nn.Linear がありません")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)  # parent_name が "" ならモデル自身
        setattr(parent, child, LoRALinear(linear, r, alpha, dropout))
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """アダプタの重み（名前が lora_A・lora_B で終わるパラメータ）だけを、モデルから切り離したコピーで返します。"""
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


# =======================================================================================
# Around the exercises: loading, merging, counting


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """アダプタの重みを、LoRA を注入済みのモデルに読み込みます。名前や形が 1 つでも合わなければエラーにします。

    strict=False の load_state_dict は、名前が 1 つも合わなくても黙って何もしません。ここでは
    「モデルのアダプタの名前の集合」と「ファイルの名前の集合」が等しいことを先に確かめます。
    """
    expected = set(lora_state_dict(model))
    given = set(state)
    if expected != given:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        kinds = (("モデルにあってファイルにない名前が", missing), ("ファイルにあってモデルにない名前が", unexpected))
        parts = [f"{what} {len(names)} 個（たとえば {names[0]}）" for what, names in kinds if names]
        raise KeyError("アダプタの名前が合いません。" + "、".join(parts) + "。注入した層を確認してください。")
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys  # 上で確かめたので起きないはず


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA layers of a model by name: every module holding tensors ``lora_A`` and ``lora_B``.

    Recognised by those names rather than by class, so that a reader's own LoRALinear counts too.
    """
    return {name: m for name, m in model.named_modules()
            if all(isinstance(getattr(m, k, None), torch.Tensor) for k in ("lora_A", "lora_B"))}


def merge_lora(model: nn.Module) -> nn.Module:
    """すべての LoRA の層を、ΔW を足し込んだ普通の nn.Linear に置き換えます（peft の merge_and_unload に当たる）。"""
    for name, m in lora_layers(model).items():
        m.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.base)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes of every tensor the optimizer keeps between steps (AdamW: exp_avg and exp_avg_sq)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


@dataclass(frozen=True)
class DecoderShape:
    """The linear layers of a Llama-style decoder, enough for parameter arithmetic."""

    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab: int

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one block, by its module name."""
        d, kv = self.hidden, self.hidden // self.n_heads * self.n_kv_heads
        return {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
                "gate_proj": (d, self.intermediate), "up_proj": (d, self.intermediate),
                "down_proj": (self.intermediate, d)}

    def total_parameters(self) -> int:
        per_block = sum(i * o for i, o in self.linear_shapes().values()) + 2 * self.hidden  # + 2 つの RMSNorm
        return self.n_layers * per_block + 2 * self.vocab * self.hidden + self.hidden  # 埋め込み・出力層・最後の正規化

    def lora_parameters(self, r: int, targets) -> int:
        """LoRA adds r·(in + out) parameters to each targeted linear layer."""
        shapes = self.linear_shapes()
        return self.n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


LLAMA2_7B = DecoderShape(hidden=4096, intermediate=11008, n_layers=32, n_heads=32, n_kv_heads=32, vocab=32000)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")


def copy_lora_into_peft(own: nn.Module, peft_model: nn.Module, adapter: str = "default") -> int:
    """Copy every (lora_A, lora_B) of our injected model into the peft model with the same targets.

    peft keeps A and B as ``nn.Linear`` layers: ``...q_proj.lora_A.default.weight`` is (r, in) and
    ``...q_proj.lora_B.default.weight`` is (out, r), the same shapes as ours. Returns the count of
    layers copied (and fails when the two models do not have the same targeted layers).
    """
    ours = lora_layers(own)
    theirs = {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
              if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)}
    if set(ours) != set(theirs):
        raise ValueError(f"LoRA の層が違います: 自作だけ {sorted(set(ours) - set(theirs))[:3]}、"
                         f"peft だけ {sorted(set(theirs) - set(ours))[:3]}")
    with torch.no_grad():
        for name, m in ours.items():
            theirs[name].lora_A[adapter].weight.copy_(m.lora_A)
            theirs[name].lora_B[adapter].weight.copy_(m.lora_B)
    return len(ours)


# =======================================================================================
# The lab: a tokenizer, two tasks, a small Llama, training and accuracy


class CharTokenizer:
    """One token per character of '0123456789+-=\\n', and '_' for padding (never trained on).

    It answers ``encode(text, add_special_tokens=False)`` and ``decode(ids)`` like a Hugging Face
    tokenizer, so the chapter's code runs unchanged with a real model's tokenizer.
    """

    chars = "0123456789+-=\n_"

    def __init__(self):
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.pad_token_id = self.stoi["_"]
        self.eos_token_id = self.stoi["\n"]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


@dataclass(frozen=True)
class ArithmeticTask:
    """All problems a ∘ b for 0 ≤ a, b ≤ max_operand, split into training and held-out pairs.

    ``kind``: "add" writes "37+85=" → "122"; "reverse" asks the same sum written backwards
    ("37+85=" → "221"), a new output format for a model that knows addition.
    """

    kind: str = "add"
    max_operand: int = 99
    val_fraction: float = 0.2
    seed: int = 0

    def prompt_and_answer(self, a: int, b: int) -> tuple[str, str]:
        total = str(a + b)
        if self.kind == "add":
            return f"{a}+{b}=", total + "\n"
        if self.kind == "reverse":
            return f"{a}+{b}=", total[::-1] + "\n"
        raise ValueError(f"未知の課題 {self.kind!r}")

    def split(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(train, held_out): the same split of ordered pairs (a, b) for every kind, so a held-out pair is
        unseen in both tasks (its twin (b, a), which has the same sum, may be in training)."""
        pairs = [(a, b) for a in range(self.max_operand + 1) for b in range(self.max_operand + 1)]
        random.Random(self.seed).shuffle(pairs)
        n_val = round(len(pairs) * self.val_fraction)
        return pairs[n_val:], pairs[:n_val]


def make_batch(tokenizer, task: ArithmeticTask, pairs, device="cpu"):
    """input_ids and labels (B, T), right-padded; labels are -100 except on the answer's tokens.

    A sequence is encode("\\n" + prompt) + encode(answer), the two parts encoded separately so that
    a subword tokenizer cannot merge across "=". Right padding needs no attention mask in a causal
    model: a padded position comes after every real one, so no real position attends to it.
    """
    seqs, labels = [], []
    for a, b in pairs:
        prompt, answer = task.prompt_and_answer(a, b)
        p = tokenizer.encode("\n" + prompt, add_special_tokens=False)
        q = tokenizer.encode(answer, add_special_tokens=False)
        seqs.append(p + q)
        labels.append([-100] * len(p) + q)
    T = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    x = torch.full((len(seqs), T), pad, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
        x[i, :len(s)] = torch.tensor(s)
        y[i, :len(s)] = torch.tensor(lab)
    return x.to(device), y.to(device)


def lm_loss(model, x, y):
    """Mean next-token cross-entropy over the labelled positions (the answer's tokens)."""
    logits = model(input_ids=x).logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    return F.cross_entropy(logits.flatten(0, 1).float(), y[:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def answer_accuracy(model, tokenizer, task: ArithmeticTask, pairs, device="cpu", batch_size=512) -> float:
    """Share of problems whose every answer token (the final newline too) is the model's top choice.

    With the correct answer as context this is exactly "greedy decoding writes the answer": greedy
    decoding follows the correct tokens for as long as each is the top choice.
    """
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(pairs), batch_size):
            x, y = make_batch(tokenizer, task, pairs[i:i + batch_size], device)
            pred = model(input_ids=x).logits[:, :-1].argmax(-1)  # (B, T-1)
            target = y[:, 1:]
            correct += ((pred == target) | (target == -100)).all(1).sum().item()
    finally:
        model.train(was_training)
    return correct / len(pairs)


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens=6, device="cpu") -> str:
    """The model's answer to one prompt, written by greedy decoding up to the first newline."""
    ids = torch.tensor([tokenizer.encode("\n" + prompt, add_special_tokens=False)], device=device)
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[0, -1].argmax().item()
            out.append(nxt)
            if "\n" in tokenizer.decode(out):
                break
            ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
    model.train(was_training)
    return tokenizer.decode(out).split("\n")[0]


def quiet_libraries() -> None:
    """Silence what transformers, peft and bitsandbytes print that says nothing to a reader here:
    progress bars for loading and saving tiny models, and bitsandbytes' note about optional CPU kernels."""
    import logging
    import warnings

    for name in ("bitsandbytes", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def new_tiny_llama(tokenizer, hidden_size=128, n_layers=4, n_heads=4, intermediate_size=344, seed=0):
    """A randomly initialised Llama built from a config (no download): the stand-in for a pretrained model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_base(name_or_dir, device="cpu"):
    """The base model, freshly loaded: a local directory written by save_pretrained, or a Hub name (Colab)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=torch.float32).to(device)


def training_step(model, optimizer, x, y) -> float:
    loss = lm_loss(model, x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_causal_lm(model, tokenizer, task: ArithmeticTask, steps: int, lr: float, batch_size=64, seed=0,
                    weight_decay=0.0, device="cpu", eval_every=None, log=None):
    """AdamW on the parameters that require grad, linear warm-up (5 %) then cosine decay.

    Returns a history: the loss of every step, the held-out accuracy every ``eval_every`` steps,
    the median time of a step (ms, the first 5 steps left out), the trainable parameter count and
    the bytes of the optimizer's state.
    """
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("学習するパラメータが 1 つもありません（requires_grad=True のパラメータがない）")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    train_pairs, val_pairs = task.split()
    rng = random.Random(seed)
    history = {"loss": [], "eval_step": [], "accuracy": [], "step_ms": []}
    for step in range(1, steps + 1):
        x, y = make_batch(tokenizer, task, rng.sample(train_pairs, batch_size), device)
        start = time.perf_counter()
        history["loss"].append(training_step(model, opt, x, y))
        history["step_ms"].append((time.perf_counter() - start) * 1000)
        sched.step()
        if eval_every and (step % eval_every == 0 or step == steps):
            acc = answer_accuracy(model, tokenizer, task, val_pairs, device)
            history["eval_step"].append(step)
            history["accuracy"].append(acc)
            if log:
                log(f"step {step:5d}  損失 {history['loss'][-1]:.3f}  未知の問題の正答率 {acc:.1%}")
    history["median_step_ms"] = statistics.median(history["step_ms"][5:] or history["step_ms"])
    history["trainable"] = sum(p.numel() for p in params)
    history["optimizer_state_bytes"] = optimizer_state_bytes(opt)
    return history


def adapt(base_source, tokenizer, task: ArithmeticTask, steps: int, lr: float, r: int = 0, targets=ALL_LINEAR,
          batch_size=32, seed=0, device="cpu", dropout=0.0, eval_every=None):
    """One adaptation run from a freshly loaded base: full fine-tuning (r = 0) or LoRA (alpha = 2r, ``dropout``).

    The seed decides LoRA's A and the order of the batches. Returns (model, history) with the
    held-out accuracy at the end in ``history["final_accuracy"]`` (and every ``eval_every`` steps in
    ``history["accuracy"]``).
    """
    model = load_base(base_source, device)
    torch.manual_seed(seed)
    if r:
        inject_lora(model, targets, r, 2 * r, dropout)
    history = train_causal_lm(model, tokenizer, task, steps, lr, batch_size=batch_size, seed=seed, device=device,
                              eval_every=eval_every)
    history["final_accuracy"] = answer_accuracy(model, tokenizer, task, task.split()[1], device)
    return model, history


@torch.no_grad()
def input_energy(model, x, names) -> dict[str, torch.Tensor]:
    """For each named linear layer, ``singular_value_energy`` of its inputs over every position of the batch ``x``."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda module, args, n=n: inputs.__setitem__(n, args[0].detach())) for n in names]
    try:
        model(input_ids=x)
    finally:
        for h in hooks:
            h.remove()
    return {n: singular_value_energy(inputs[n].flatten(0, -2)) for n in names}


def singular_value_energy(delta: torch.Tensor) -> torch.Tensor:
    """Cumulative share of ‖ΔW‖²_F held by the top-k singular directions, k = 1, 2, ..."""
    s = torch.linalg.svdvals(delta.double())
    return (s**2).cumsum(0) / (s**2).sum()
