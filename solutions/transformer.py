"""Chapter 1: Transformer and multi-head attention (what the reader reads).

The reference answers of the chapter's exercises, the small causal language model built from
them, the generated addition corpus it learns, its training and evaluation, and the attention
benchmark. Later chapters import the attention and the block from here. The exercises' tests
live in ``solutions/exercises/transformer.py``; the shared instruments (timing, memory,
recording) in ``solutions/instruments.py``.
"""

from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .instruments import peak_memory_mib, time_ms

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
        assert self.max_len >= T, f"系列長 {T} が max_len={self.max_len} を超えています"
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
        for (a, b), ids in zip(group, out.cpu(), strict=True):
            text = corpus.decode(ids).split("\n")[0]
            ok = text == str(a + b)
            correct += ok
            if len(examples) < 8:
                examples.append(f"{a}+{b}={text}" + ("" if ok else f"  （正解 {a + b}）"))
    return correct / len(pairs), examples


# =======================================================================================
# Naive attention against F.scaled_dot_product_attention


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

        naive = functools.partial(scaled_dot_product_attention, q, k, v, mask)
        fused = functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)

        diff = (naive()[0] - fused()).abs().max().item()
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
