"""Chapter 1: Transformer and multi-head attention.

Reference answers of the chapter's exercises, the small causal language model built from
them, the generated addition corpus it learns, and the measuring helpers (perplexity,
gradient and activation statistics, attention benchmarks). Later chapters import the
attention and the block from here.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checker import (
    CheckFailed,
    call_without_mutation,
    expect_close,
    expect_tensor,
    expect_tuple,
    register,
)

CHAPTER = "01_transformer"

# =======================================================================================
# Reference answers


def scaled_dot_product_attention(q, k, v, mask=None):
    """softmax(q kᵀ / √d) v.  q: (..., T_q, d), k: (..., T_k, d), v: (..., T_k, d_v).

    mask: bool, broadcastable to (..., T_q, T_k), True where attending is allowed.
    Returns (output (..., T_q, d_v), weights (..., T_q, T_k)).
    """
    d = q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (..., T_q, T_k)
    if mask is not None:
        # The most negative finite value: unlike -1e9 it fits fp16, and where a row keeps at least
        # one key, exp() gives exactly 0 for the masked ones. (A row with every key masked gets
        # uniform weights; F.scaled_dot_product_attention returns zeros there.)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)  # each row sums to 1 over the keys
    return weights @ v, weights


def causal_mask(T, device=None):
    """(T, T) bool, True on and below the diagonal: position i may look at 0..i."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def sinusoidal_positional_encoding(max_len, d_model):
    """(max_len, d_model): PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...)."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # (max_len, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float32)  # (d_model/2,)
    angle = pos / 10000 ** (two_i / d_model)  # (max_len, d_model/2)
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])  # an odd d_model has one sin more than cos
    return pe


class MultiHeadAttention(nn.Module):
    """Pure multi-head attention: no residual connection and no LayerNorm inside."""

    def __init__(self, d_model, n_heads, dropout=0.0):
        super().__init__()
        assert d_model % n_heads == 0, "d_model は n_heads で割り切れる必要があります"
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.W_q = nn.Linear(d_model, d_model)
        self.W_k = nn.Linear(d_model, d_model)
        self.W_v = nn.Linear(d_model, d_model)
        self.W_o = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, x):  # (B, T, d_model) -> (B, H, T, d_head)
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, query, key, value, mask=None):
        B, T_q, d_model = query.shape
        q = self.split_heads(self.W_q(query))  # (B, H, T_q, d_head)
        k = self.split_heads(self.W_k(key))  # (B, H, T_k, d_head)
        v = self.split_heads(self.W_v(value))  # (B, H, T_k, d_head)
        out, weights = scaled_dot_product_attention(q, k, v, mask)  # weights: (B, H, T_q, T_k)
        if self.training and self.dropout.p > 0:
            out = self.dropout(weights) @ v  # dropout acts on a copy; the returned weights stay probabilities
        out = out.transpose(1, 2).reshape(B, T_q, d_model)  # concatenate the heads
        return self.W_o(out), weights


class FeedForward(nn.Module):
    """Position-wise feed-forward network: Linear → GELU → Linear → Dropout."""

    def __init__(self, d_model, d_ff, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # (B, T, d_model) -> (B, T, d_model)
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, d_model, n_heads, d_ff, dropout=0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None):  # (B, T, d_model) -> (B, T, d_model)
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, mask)
        x = x + self.dropout(a)  # the residual stream itself is never normalized
        x = x + self.ff(self.ln2(x))
        return x


class PostLNBlock(TransformerBlock):
    """Post-LN block of the original Transformer: x = LN(x + Attn(x)), then x = LN(x + FFN(x))."""

    def forward(self, x, mask=None):
        a, _ = self.attn(x, x, x, mask)
        x = self.ln1(x + self.dropout(a))
        return self.ln2(x + self.ff(x))


# =======================================================================================
# The causal language model


class CausalTransformerLM(nn.Module):
    """Token embedding + sinusoidal positions → Pre-LN blocks → LayerNorm → logits.

    ``block_cls`` lets the chapter build the model from the reader's own block.
    """

    def __init__(self, vocab_size, d_model, n_heads, n_layers, d_ff, max_len, dropout=0.0,
                 block_cls=TransformerBlock):
        super().__init__()
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)  # N(0, 1) init: same scale as the PE
        self.register_buffer("pe", sinusoidal_positional_encoding(max_len, d_model), persistent=False)
        self.register_buffer("mask", causal_mask(max_len), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(block_cls(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, idx):  # idx: (B, T) token ids -> logits (B, T, vocab)
        T = idx.size(1)
        assert T <= self.max_len, f"系列長 {T} が max_len={self.max_len} を超えています"
        x = self.drop(self.tok_emb(idx) + self.pe[:T])  # (B, T, d_model)
        mask = self.mask[:T, :T]  # (T, T): the model never sees the future
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


# =======================================================================================
# Data: a generated corpus of additions such as "37+85=122"


@dataclass
class AdditionCorpus:
    chars: list[str]
    train_ids: torch.Tensor  # (N_train,) int64, every training line concatenated
    val_ids: torch.Tensor  # (N_val,) int64, lines whose (a, b) never occur in training
    val_pairs: list[tuple[int, int]]
    max_operand: int

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.chars.index(c) for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def make_addition_corpus(max_operand=99, val_fraction=0.2, train_repeats=4, seed=0) -> AdditionCorpus:
    """Every sum a+b with 0 <= a, b <= max_operand, one per line; pairs split train/val.

    The training stream repeats the training lines ``train_repeats`` times, each time in a
    new random order, so that a random window sees many different neighbours.
    """
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    rng.shuffle(pairs)
    n_val = int(len(pairs) * val_fraction)
    val_pairs, train_pairs = pairs[:n_val], pairs[n_val:]
    chars = list("0123456789+=\n")

    def stream(ps, repeats):
        lines = []
        for _ in range(repeats):
            ps = ps[:]
            rng.shuffle(ps)
            lines += [f"{a}+{b}={a + b}\n" for a, b in ps]
        return "".join(lines)

    def ids(text):
        return torch.tensor([chars.index(c) for c in text], dtype=torch.long)

    return AdditionCorpus(chars, ids(stream(train_pairs, train_repeats)), ids(stream(val_pairs, 1)),
                          val_pairs, max_operand)


def get_batch(ids, batch_size, block_size, generator=None, device="cpu"):
    """Random windows: x = ids[i : i+T], y = ids[i+1 : i+T+1], both (B, T)."""
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)
    x = torch.stack([ids[s:s + block_size] for s in starts])
    y = torch.stack([ids[s + 1:s + block_size + 1] for s in starts])
    return x.to(device), y.to(device)


@torch.no_grad()
def evaluate_loss(model, ids, block_size, device="cpu", max_windows=None, batch_size=256):
    """Mean next-token cross-entropy (nats) over consecutive windows of ``ids``."""
    was_training = model.training
    model.eval()
    n = (len(ids) - 1) // block_size
    if max_windows is not None:
        n = min(n, max_windows)
    x = ids[: n * block_size].view(n, block_size)
    y = ids[1: n * block_size + 1].view(n, block_size)
    total = 0.0
    for i in range(0, n, batch_size):
        logits = model(x[i:i + batch_size].to(device))
        total += F.cross_entropy(logits.flatten(0, 1), y[i:i + batch_size].flatten().to(device),
                                 reduction="sum").item()
    model.train(was_training)
    return total / (n * block_size)


def train_lm(model, corpus, steps, batch_size, block_size, lr, device="cpu", eval_every=100,
             eval_windows=200, seed=0, log=print):
    """AdamW with linear warm-up then cosine decay; returns the loss history."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    gen = torch.Generator().manual_seed(seed)
    history = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = get_batch(corpus.train_ids, batch_size, block_size, gen, device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        history["step"].append(step)
        history["train_loss"].append(loss.item())
        if step % eval_every == 0 or step == steps:
            val = evaluate_loss(model, corpus.val_ids, block_size, device, max_windows=eval_windows)
            history["val_step"].append(step)
            history["val_loss"].append(val)
            if log:
                log(f"step {step:5d}  学習損失 {loss.item():.3f}  検証損失 {val:.3f}  "
                    f"({time.perf_counter() - start:.0f} 秒)")
    history["seconds"] = time.perf_counter() - start
    return history


def bigram_perplexity(corpus, smoothing=1.0):
    """Validation perplexity of a count-based bigram model (add-``smoothing``) fit on train."""
    V = corpus.vocab_size
    counts = torch.full((V, V), float(smoothing))
    counts.index_put_((corpus.train_ids[:-1], corpus.train_ids[1:]), torch.ones(len(corpus.train_ids) - 1),
                      accumulate=True)
    logp = (counts / counts.sum(1, keepdim=True)).log()
    nll = -logp[corpus.val_ids[:-1], corpus.val_ids[1:]].mean()
    return math.exp(nll.item())


def ideal_perplexity(corpus):
    """The best any model can do: operands are uniform, everything else is determined.

    Each line carries log((max_operand+1)^2) nats of surprise (its two operands); the
    separators, the sum and the newline cost nothing to a model that can add.
    """
    n = corpus.max_operand + 1
    mean_chars = sum(len(f"{a}+{b}={a + b}\n") for a in range(n) for b in range(n)) / n**2
    return math.exp(2 * math.log(n) / mean_chars)


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, temperature=0.0, generator=None):
    """Extend (B, T) ids by sampling (``temperature`` > 0) or greedily (0)."""
    was_training = model.training
    model.eval()
    idx = prompt_ids
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.max_len:])[:, -1]  # (B, vocab)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    model.train(was_training)
    return idx


@torch.no_grad()
def addition_accuracy(model, corpus, n=500, device="cpu"):
    """Share of held-out sums that greedy decoding gets exactly right, and some examples."""
    pairs = corpus.val_pairs[:n]
    by_len: dict[int, list[tuple[int, int]]] = {}
    for a, b in pairs:
        by_len.setdefault(len(f"{a}+{b}="), []).append((a, b))
    correct, examples = 0, []
    answer_len = len(str(2 * corpus.max_operand)) + 1  # digits of the sum, then "\n"
    for length, group in by_len.items():
        prompts = torch.stack([corpus.encode(f"\n{a}+{b}=") for a, b in group]).to(device)
        out = generate(model, prompts, answer_len)[:, length + 1:]
        for (a, b), ids in zip(group, out.cpu()):
            text = corpus.decode(ids).split("\n")[0]
            ok = text == str(a + b)
            correct += ok
            if len(examples) < 8:
                examples.append(f"{a}+{b}={text}" + ("" if ok else f"  （正解 {a + b}）"))
    return correct / len(pairs), examples


# =======================================================================================
# Looking inside: gradient norms and activation statistics


def gradient_norms(model):
    """L2 norm of the gradient of every parameter tensor, keyed by its name."""
    return {name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None}


def block_gradient_norms(model):
    """One number per block of ``model.blocks``: the L2 norm of all its parameters' gradients."""
    return [math.sqrt(sum(p.grad.norm().item() ** 2 for p in block.parameters() if p.grad is not None))
            for block in model.blocks]


@contextlib.contextmanager
def record_outputs(modules: dict[str, nn.Module]):
    """Record each module's output (detached; a tuple stays a tuple) during the ``with`` body."""
    store: dict[str, object] = {}
    handles = []
    for name, module in modules.items():
        def hook(mod, args, out, name=name):
            store[name] = tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


# =======================================================================================
# Naive attention against F.scaled_dot_product_attention


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C++ profiler's start/stop lines, which bypass Python's sys.stderr."""
    try:
        fd = os.dup(2)
    except OSError:  # no usable stderr (some notebook front ends): nothing to silence
        yield
        return
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def peak_memory_mib(fn, device) -> float:
    """Peak memory (MiB) that ``fn()`` allocates beyond what was already allocated.

    On CUDA: the allocator's peak. On the CPU: the running sum of allocations and frees
    recorded by the PyTorch profiler, in time order.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def time_ms(fn, device, repeats=5) -> float:
    """Median wall time of ``fn()`` in milliseconds, after one warm-up call."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


@torch.no_grad()
def benchmark_attention(lengths, batch=1, heads=8, d_head=64, device="cpu", dtype=torch.float32,
                        repeats=5):
    """Causal attention, naive (our function) vs ``F.scaled_dot_product_attention``.

    Returns one dict per length: times (ms), peak memory (MiB), speed-up, max difference.
    """
    rows = []
    for T in lengths:
        q, k, v = (torch.randn(batch, heads, T, d_head, device=device, dtype=dtype) for _ in range(3))
        mask = causal_mask(T, device=device)

        def naive():
            return scaled_dot_product_attention(q, k, v, mask)[0]

        def fused():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        diff = (naive() - fused()).abs().max().item()
        t_naive, t_fused = time_ms(naive, device, repeats), time_ms(fused, device, repeats)
        rows.append({
            "T": T,
            "naive_ms": t_naive,
            "sdpa_ms": t_fused,
            "speedup": t_naive / t_fused,
            "naive_mib": peak_memory_mib(naive, device),
            "sdpa_mib": peak_memory_mib(fused, device),
            "max_diff": diff,
        })
    return rows


# =======================================================================================
# Exercises and their tests

_HINT_ATTENTION = (
    "よくある原因: 1/√d のスケーリング忘れ、softmax の軸（キーの軸 dim=-1 で正規化します）、"
    "マスクの向き（True が「見てよい」位置です）。"
)


def _attention_variants(q, k, v, mask):
    """Outputs of well-known wrong versions, to name the likely mistake."""
    d = q.size(-1)

    def attend(scores, dim=-1, invert=False):
        if mask is not None:
            m = mask if invert else ~mask
            scores = scores.masked_fill(m, torch.finfo(scores.dtype).min)
        return scores.softmax(dim) @ v

    raw = q @ k.transpose(-2, -1)
    variants = {
        "1/√d のスケーリングがありません。": attend(raw),
        "√d ではなく d で割っています。": attend(raw / d),
        "softmax の軸が違います（dim=-2 ではなく dim=-1、キーの軸で正規化します）。": attend(raw / math.sqrt(d), dim=-2),
    }
    if mask is not None:
        variants["マスクの向きが逆です（True が「見てよい」位置です。masked_fill には ~mask を渡します）。"] = attend(
            raw / math.sqrt(d), invert=True)
        w = (raw / math.sqrt(d)).softmax(-1) * mask
        variants["マスクを softmax の後に掛けています（各行の和が 1 になりません）。"] = w @ v
    return variants


def _check_attention_case(answer, ref, shape_q, shape_k, mask=None, dtype=torch.float32, d_v=None, device="cpu"):
    q = torch.randn(*shape_q, dtype=dtype, device=device)
    k = torch.randn(*shape_k, dtype=dtype, device=device)
    v = torch.randn(*shape_k[:-1], d_v or shape_k[-1], dtype=dtype, device=device)
    result = call_without_mutation(answer, q, k, v, mask)
    out, weights = expect_tuple(result, "戻り値 (output, weights)", 2)
    ref_out, ref_w = ref(q, k, v, mask)
    expect_tensor(out, "output", shape=ref_out.shape, dtype=dtype)
    expect_tensor(weights, "weights", shape=ref_w.shape, dtype=dtype)
    if not torch.allclose(out, ref_out, atol=1e-5, rtol=1e-4):
        for reason, wrong in _attention_variants(q, k, v, mask).items():
            if torch.allclose(out, wrong, atol=1e-5, rtol=1e-4):
                raise CheckFailed(f"output が模範解答と一致しません。原因: {reason}")
    expect_close(out, ref_out, "output", hint=_HINT_ATTENTION)
    expect_close(weights, ref_w, "weights", hint="weights には softmax 後の確率（dropout 前）を返してください。")


def _register_attention():
    ex = register("scaled_dot_product_attention", "スケール化ドット積アテンション", chapter=CHAPTER,
                  reference=scaled_dot_product_attention)

    @ex.test("マスクなし・4 次元入力 (B, H, T, d)")
    def _(answer, ref):
        _check_attention_case(answer, ref, (2, 3, 5, 8), (2, 3, 5, 8))

    @ex.test("各行の重みが確率（0 以上で和が 1）になっている")
    def _(answer, ref):
        q, k, v = (torch.randn(2, 4, 6) for _ in range(3))
        _, w = expect_tuple(answer(q, k, v), "戻り値 (output, weights)", 2)
        expect_tensor(w, "weights", shape=(2, 4, 4))
        if (w < 0).any():
            raise CheckFailed("weights に負の値があります。softmax を通した確率を返してください。")
        expect_close(w.sum(-1), torch.ones(2, 4), "weights の行和", hint="softmax はキーの軸（dim=-1）に沿って取ります。")

    @ex.test("クエリとキーの長さが違う (T_q=3, T_k=7) 3 次元入力")
    def _(answer, ref):
        _check_attention_case(answer, ref, (2, 3, 8), (2, 7, 8))

    @ex.test("因果マスク (T, T) をバッチとヘッドにブロードキャストする")
    def _(answer, ref):
        mask = causal_mask(6)
        _check_attention_case(answer, ref, (2, 2, 6, 4), (2, 2, 6, 4), mask)
        _, w = answer(torch.randn(1, 6, 4), torch.randn(1, 6, 4), torch.randn(1, 6, 4), mask)
        if w[..., ~mask].abs().max() > 1e-6:
            raise CheckFailed("マスクで禁止した位置（未来のトークン）に 0 でない重みがあります。")

    @ex.test("パディングマスク (B, 1, 1, T_k)")
    def _(answer, ref):
        mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
        mask[0, ..., 3:] = False  # the first sequence has two padding positions
        _check_attention_case(answer, ref, (2, 3, 4, 8), (2, 3, 5, 8), mask)

    @ex.test("バッチ 1・長さ 1・奇数の次元、float64 のまま計算する")
    def _(answer, ref):
        _check_attention_case(answer, ref, (1, 1, 1, 5), (1, 1, 1, 5), dtype=torch.float64)
        _check_attention_case(answer, ref, (1, 7, 5), (1, 7, 5), causal_mask(7), dtype=torch.float64)

    @ex.test("バリューの次元がクエリ・キーと違う (d=8, d_v=3)")
    def _(answer, ref):
        _check_attention_case(answer, ref, (2, 4, 8), (2, 6, 8), d_v=3)

    @ex.test("GPU 上でも動く（GPU があるときだけ調べます）")
    def _(answer, ref):
        if torch.cuda.is_available():
            _check_attention_case(answer, ref, (2, 2, 6, 8), (2, 2, 6, 8), causal_mask(6, device="cuda"),
                                  device="cuda")


def _register_causal_mask():
    ex = register("causal_mask", "因果マスク", chapter=CHAPTER, reference=causal_mask)

    @ex.test("形・dtype・値が模範解答と一致する")
    def _(answer, ref):
        for T in (1, 2, 5, 8):
            m = answer(T)
            expect_tensor(m, f"causal_mask({T})", shape=(T, T), dtype=torch.bool, device="cpu")
            expected = ref(T)
            if not torch.equal(m, expected):
                if torch.equal(m, ~expected):
                    why = "True と False が逆です。True が「見てよい」位置（対角とその左下）です。"
                elif torch.equal(m, expected.T):
                    why = "上三角になっています。位置 i が見てよいのは 0..i（下三角）です。"
                elif torch.equal(m, expected.tril(-1)):
                    why = "対角が False です。自分自身の位置は見てよい位置に含めます。"
                else:
                    why = f"T={T} で値が違います。期待値:\n{expected.int()}"
                raise CheckFailed(why)

    @ex.test("device 引数で指定したデバイスに作る")
    def _(answer, ref):
        m = answer(4, device=torch.device("cpu"))
        expect_tensor(m, "causal_mask(4, device=cpu)", shape=(4, 4), dtype=torch.bool, device="cpu")
        # "meta" tensors have a shape but no data: any device argument that is passed on shows here.
        m = answer(4, device="meta")
        expect_tensor(m, 'causal_mask(4, device="meta")', shape=(4, 4), dtype=torch.bool, device="meta")


def _register_positional_encoding():
    ex = register("sinusoidal_positional_encoding", "正弦波の位置エンコーディング", chapter=CHAPTER,
                  reference=sinusoidal_positional_encoding)

    @ex.test("形・dtype・値が模範解答と一致する")
    def _(answer, ref):
        for max_len, d in ((50, 16), (1, 4), (7, 6)):
            pe = answer(max_len, d)
            expected = ref(max_len, d)
            expect_tensor(pe, f"PE({max_len}, {d})", shape=(max_len, d), dtype=torch.float32)
            if torch.allclose(pe, expected, atol=1e-5):
                continue
            swapped = torch.stack([expected[:, 1::2], expected[:, 0::2]], -1).flatten(1)
            concat = torch.cat([expected[:, 0::2], expected[:, 1::2]], 1)
            if torch.allclose(pe, swapped, atol=1e-5):
                raise CheckFailed("sin と cos が逆です。偶数番目の次元 (2i) が sin、奇数番目 (2i+1) が cos です。")
            if torch.allclose(pe, concat, atol=1e-5):
                raise CheckFailed("sin を前半、cos を後半にまとめています。原論文どおり偶数次元と奇数次元に交互に入れてください。")
            expect_close(pe, expected, f"PE({max_len}, {d})", atol=1e-5,
                         hint="周波数は 1/10000^(2i/d_model) です（i ではなく 2i、底は 10000）。")

    @ex.test("位置 0 の行は [0, 1, 0, 1, ...]")
    def _(answer, ref):
        pe = answer(3, 8)
        expect_close(pe[0], torch.tensor([0.0, 1.0] * 4), "PE[0]")


def _copy_projections(src, dst):
    for name in ("W_q", "W_k", "W_v", "W_o"):
        s, d = getattr(src, name), getattr(dst, name, None)
        if not isinstance(d, nn.Linear):
            raise CheckFailed(f"self.{name} が nn.Linear ではありません（{type(d).__name__}）。")
        if d.bias is None:
            raise CheckFailed(f"self.{name} にバイアスがありません。nn.Linear(d_model, d_model) のまま（bias=True）にしてください。")
        if d.weight.shape != s.weight.shape:
            raise CheckFailed(f"self.{name}.weight の shape は {tuple(s.weight.shape)} のはずですが、"
                              f"{tuple(d.weight.shape)} でした。")
        with torch.no_grad():
            d.weight.copy_(s.weight)
            d.bias.copy_(s.bias)


def _mha_pair(answer, ref, d_model=16, n_heads=4, dropout=0.0, device="cpu"):
    theirs = answer(d_model, n_heads, dropout=dropout)
    ours = ref(d_model, n_heads, dropout=dropout)
    _copy_projections(ours, theirs)
    return theirs.to(device).eval(), ours.to(device).eval()


def _heads_not_transposed(mha, query, key, value, mask):
    """The classic bug: view(B, H, T, d_head) straight away, without transpose(1, 2)."""
    B, T_q, D = query.shape
    split = lambda x: x.reshape(B, mha.n_heads, -1, mha.d_head)  # noqa: E731
    out, _ = scaled_dot_product_attention(split(mha.W_q(query)), split(mha.W_k(key)), split(mha.W_v(value)), mask)
    candidates = [out.transpose(1, 2).reshape(B, T_q, D), out.reshape(B, T_q, D)]
    return [mha.W_o(c) for c in candidates]


def _check_mha_case(answer, ref, B, T_q, T_k, mask=None, self_attention=False, device="cpu"):
    theirs, ours = _mha_pair(answer, ref, device=device)
    query = torch.randn(B, T_q, 16, device=device)
    key = query if self_attention else torch.randn(B, T_k, 16, device=device)
    value = query if self_attention else torch.randn(B, T_k, 16, device=device)
    with torch.no_grad():
        result = call_without_mutation(theirs, query, key, value, mask)
        out, w = expect_tuple(result, "戻り値 (output, weights)", 2)
        ref_out, ref_w = ours(query, key, value, mask)
    expect_tensor(out, "output", shape=ref_out.shape)
    if w is None or (isinstance(w, torch.Tensor) and w.dim() == 3):
        raise CheckFailed(f"weights の shape は (B, H, T_q, T_k) = {tuple(ref_w.shape)} のはずです。"
                          "ヘッドごとの重みを平均せずに返してください。")
    expect_tensor(w, "weights", shape=ref_w.shape)
    if not torch.allclose(out, ref_out, atol=1e-5, rtol=1e-4):
        added = ref_out + query
        if torch.allclose(out, added, atol=1e-4) or torch.allclose(out, F.layer_norm(added, (16,)), atol=1e-4):
            raise CheckFailed("出力に入力 query が足されています。MultiHeadAttention の中では残差接続も層正規化もせず、"
                              "ブロックの側で 1 回だけ行います。")
        with torch.no_grad():
            if mask is None and any(torch.allclose(out, c, atol=1e-5, rtol=1e-4)
                                    for c in _heads_not_transposed(ours, query, key, value, mask)):
                raise CheckFailed("ヘッドの分け方が違います。view(B, T, H, d_head) の後に transpose(1, 2) で "
                                  "(B, H, T, d_head) にしてください（いきなり view(B, H, T, d_head) にすると位置とヘッドが混ざります）。")
    expect_close(out, ref_out, "output", hint=(
        "よくある原因: view の後の transpose(1, 2) 忘れ（ヘッドの分け方）、ヘッドを結合する前の transpose 忘れ、"
        "d_model ではなく d_head でのスケーリング、W_o の掛け忘れ。"))
    expect_close(w, ref_w, "weights", hint="weights には各ヘッドの softmax 後の確率を返してください。")


def _register_mha():
    ex = register("multi_head_attention", "マルチヘッドアテンション", chapter=CHAPTER, reference=MultiHeadAttention)

    @ex.test("MultiHeadAttention(16, 4) が W_q, W_k, W_v, W_o を持つ")
    def _(answer, ref):
        _mha_pair(answer, ref)

    @ex.test("自己アテンション、マスクなし")
    def _(answer, ref):
        _check_mha_case(answer, ref, B=2, T_q=5, T_k=5, self_attention=True)

    @ex.test("クロスアテンション (T_q=3, T_k=7)")
    def _(answer, ref):
        _check_mha_case(answer, ref, B=2, T_q=3, T_k=7)

    @ex.test("因果マスク (T, T)")
    def _(answer, ref):
        _check_mha_case(answer, ref, B=2, T_q=6, T_k=6, mask=causal_mask(6), self_attention=True)

    @ex.test("パディングマスク (B, 1, 1, T_k) と (B, 1, T_q, T_k)")
    def _(answer, ref):
        pad = torch.ones(2, 1, 1, 5, dtype=torch.bool)
        pad[1, ..., 2:] = False
        _check_mha_case(answer, ref, B=2, T_q=4, T_k=5, mask=pad)
        full = torch.rand(2, 1, 4, 5) > 0.3
        full[..., 0] = True  # every query may see at least one key
        _check_mha_case(answer, ref, B=2, T_q=4, T_k=5, mask=full)

    @ex.test("バッチ 1・長さ 1")
    def _(answer, ref):
        _check_mha_case(answer, ref, B=1, T_q=1, T_k=1, self_attention=True)

    @ex.test("dropout=1 の学習モードでは、アテンションの重みがすべて落ちて出力は W_o のバイアスだけになる")
    def _(answer, ref):
        theirs, ours = _mha_pair(answer, ref, dropout=1.0)
        theirs.train()
        x = torch.randn(2, 5, 16)
        with torch.no_grad():
            out, _ = expect_tuple(theirs(x, x, x), "戻り値 (output, weights)", 2)
            expected = ours.W_o.bias.expand(2, 5, 16)
        expect_close(out, expected, "dropout=1 の学習モードの output",
                     hint="dropout は softmax 後の重み（出力の計算に使うほう）に self.dropout で掛けます。"
                          "dropout を使っていないか、重み以外（出力など）に掛けていませんか。")

    @ex.test("GPU 上でも動く（GPU があるときだけ調べます）")
    def _(answer, ref):
        if torch.cuda.is_available():
            _check_mha_case(answer, ref, B=2, T_q=6, T_k=6, mask=causal_mask(6, device="cuda"),
                            self_attention=True, device="cuda")

    @ex.test("dropout 引数: 評価モードでは出力を変えず、学習モードでも weights は確率のまま")
    def _(answer, ref):
        theirs, ours = _mha_pair(answer, ref, dropout=0.5)
        x = torch.randn(2, 5, 16)
        with torch.no_grad():
            out, _ = theirs(x, x, x)
            ref_out, _ = ours(x, x, x)
            expect_close(out, ref_out, "評価モードの output", hint="dropout は self.training のときだけ効かせます。")
            theirs.train()
            _, w = theirs(x, x, x)
        expect_tensor(w, "学習モードの weights", shape=(2, 4, 5, 5))
        expect_close(w.sum(-1), torch.ones(2, 4, 5), "学習モードの weights の行和",
                     hint="dropout は出力の計算に使う重みにだけ掛け、返す weights は softmax の確率のままにします。")


def _register_block():
    ex = register("transformer_block", "Pre-LN Transformer ブロック", chapter=CHAPTER, reference=TransformerBlock)

    def pair(answer, ref, dropout=0.0):
        theirs = answer(16, 4, 32, dropout=dropout)
        ours = ref(16, 4, 32, dropout=dropout)
        with torch.no_grad():  # give the norms non-trivial weights so that misplaced norms show
            for p in ours.parameters():
                p.add_(0.1 * torch.randn_like(p))
        try:
            theirs.load_state_dict(ours.state_dict())
        except RuntimeError as e:
            raise CheckFailed("__init__ の ln1, attn, ln2, ff の構成を変えないでください（重みを模範解答から"
                              f"コピーして比べます）: {str(e).splitlines()[0]}") from None
        return theirs.eval(), ours.eval()

    def compare(answer, ref, B, T, mask, device="cpu"):
        theirs, ours = pair(answer, ref)
        theirs, ours = theirs.to(device), ours.to(device)
        x = torch.randn(B, T, 16, device=device)
        with torch.no_grad():
            out = call_without_mutation(theirs, x, mask)
            expected = ours(x, mask)
            expect_tensor(out, "出力", shape=expected.shape)
            if torch.allclose(out, expected, atol=1e-5, rtol=1e-4):
                return
            a = lambda h: ours.attn(h, h, h, mask)[0]  # noqa: E731
            post = ours.ln1(x + a(x))
            post = ours.ln2(post + ours.ff(post))
            h = ours.ln1(x)
            normalized_stream = h + a(h)
            normalized_stream = ours.ln2(normalized_stream) + ours.ff(ours.ln2(normalized_stream))
            if torch.allclose(out, post, atol=1e-5, rtol=1e-4):
                raise CheckFailed("Post-LN（x = LN(x + Attn(x))）になっています。この演習は Pre-LN（x = x + Attn(LN(x))）です。")
            if torch.allclose(out, normalized_stream, atol=1e-5, rtol=1e-4):
                raise CheckFailed("残差に足す側まで正規化しています。h = LN(x) はサブ層への入力にだけ使い、"
                                  "足す先は正規化前の x です。")
            if mask is not None and torch.allclose(out, ours(x, None), atol=1e-5, rtol=1e-4):
                raise CheckFailed("マスクがアテンションに渡されていません。self.attn(h, h, h, mask) のように渡してください。")
        expect_close(out, expected, "出力", hint="x = x + Attn(LN1(x)) の後に x = x + FFN(LN2(x)) です。"
                     "マスクを self.attn に渡しているかも確認してください。")

    @ex.test("マスクなし")
    def _(answer, ref):
        compare(answer, ref, B=2, T=5, mask=None)

    @ex.test("因果マスクをアテンションに渡す")
    def _(answer, ref):
        compare(answer, ref, B=2, T=6, mask=causal_mask(6))

    @ex.test("バッチ 1・長さ 1")
    def _(answer, ref):
        compare(answer, ref, B=1, T=1, mask=None)

    @ex.test("dropout=1 の学習モードでは、2 つのサブ層の出力がすべて落ちて入力がそのまま出る")
    def _(answer, ref):
        theirs, _ = pair(answer, ref, dropout=1.0)
        theirs.train()
        x = torch.randn(2, 5, 16)
        with torch.no_grad():
            out = theirs(x)
        expect_close(out, x, "dropout=1 の学習モードの出力",
                     hint="dropout はサブ層の出力（残差に足す直前）にだけ掛けます: x = x + self.dropout(a)。"
                          "残差の流れ x 自体には掛けません。")

    @ex.test("GPU 上でも動く（GPU があるときだけ調べます）")
    def _(answer, ref):
        if torch.cuda.is_available():
            compare(answer, ref, B=2, T=6, mask=causal_mask(6, device="cuda"), device="cuda")


_register_attention()
_register_causal_mask()
_register_positional_encoding()
_register_mha()
_register_block()
