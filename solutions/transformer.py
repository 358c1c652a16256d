"""Chapter 1: Transformer and multi-head attention (what the reader reads).

The reference answers of the chapter's exercises, the small causal language model built from
them, the generated addition corpus it learns, its training and evaluation, and the attention
benchmark. Later chapters import the attention and the block from here. The exercises' tests
live in ``solutions/exercises/transformer.py``; the shared instruments (timing, memory,
recording) in ``solutions/instruments.py``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .instruments import block_gradient_norms, peak_memory_mib, record_outputs, time_ms

# =======================================================================================
# Reference answers


def scaled_dot_product_attention(q, k, v, mask=None):
    """softmax(q kᵀ / √d) v。q: (..., T_q, d)、k: (..., T_k, d)、v: (..., T_k, d_v)。

    mask: bool で (..., T_q, T_k) にブロードキャストできる形状。見てよい位置が True です。
    返り値は (出力 (..., T_q, d_v), アテンションの重み (..., T_q, T_k))。
    """
    d = q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (..., T_q, T_k)
    if mask is not None:
        # 有限の値のうち最も小さいもの: -1e9 と違って fp16 にも収まり、見てよいキーが 1 つでもある行では、
        # マスクした位置の exp() はちょうど 0 になります（すべてのキーをマスクした行は一様な重みになります。
        # F.scaled_dot_product_attention はそこで 0 を返します）。
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)  # 各行はキーについて足すと 1
    return weights @ v, weights


def causal_mask(T, device=None):
    """(T, T) の bool。対角線とその下が True で、位置 i は 0..i を見てよい、という意味です。"""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def sinusoidal_positional_encoding(max_len, d_model):
    """(max_len, d_model): PE[pos, 2i] = sin(pos / 10000^(2i/d))、PE[pos, 2i+1] = cos(同じ角度)。"""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # (max_len, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float32)  # (d_model/2,)
    angle = pos / 10000 ** (two_i / d_model)  # (max_len, d_model/2)
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])  # d_model が奇数なら、sin が cos より 1 列多い
    return pe


class MultiHeadAttention(nn.Module):
    """マルチヘッドアテンションだけの層です。残差接続と層正規化は含みません。"""

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
            out = self.dropout(weights) @ v  # dropout はコピーにかけ、返す重みは確率のまま
        out = out.transpose(1, 2).reshape(B, T_q, d_model)  # ヘッドをつなげる
        return self.W_o(out), weights


class FeedForward(nn.Module):
    """位置ごとのフィードフォワードネットワーク: Linear → GELU → Linear → Dropout。"""

    def __init__(self, d_model, d_ff, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # (B, T, d_model) -> (B, T, d_model)
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Pre-LN のブロック: x + Attn(LN(x))、続いて x + FFN(LN(x))。"""

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
        x = x + self.dropout(a)  # 残差ストリームそのものは正規化しない
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
    """Token embedding + positions → Pre-LN blocks → LayerNorm → logits.

    ``block_cls`` lets the chapter build the model from the reader's own block.
    ``positions``: ``"sinusoidal"`` (fixed, section 4) or ``"learned"`` (an ``nn.Embedding``
    per position, as in GPT-2).
    """

    def __init__(self, vocab_size, d_model, n_heads, n_layers, d_ff, max_len, dropout=0.0,
                 block_cls=TransformerBlock, positions="sinusoidal"):
        super().__init__()
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)  # N(0, 1) init: same scale as the PE
        if positions == "sinusoidal":
            self.register_buffer("pe", sinusoidal_positional_encoding(max_len, d_model), persistent=False)
        elif positions == "learned":
            self.pos_emb = nn.Embedding(max_len, d_model)
        else:
            raise ValueError(f"positions は 'sinusoidal' か 'learned' です（{positions!r} が渡されました）")
        self.register_buffer("mask", causal_mask(max_len), persistent=False)
        self.drop = nn.Dropout(dropout)  # dropout on the embeddings
        self.blocks = nn.ModuleList(block_cls(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def position(self, start, T):  # (T, d_model): the encodings of positions start .. start+T-1
        if hasattr(self, "pos_emb"):
            return self.pos_emb(torch.arange(start, start + T, device=self.pos_emb.weight.device))
        return self.pe[start:start + T]

    def forward(self, idx):  # idx: (B, T) token ids -> logits (B, T, vocab)
        T = idx.size(1)
        assert self.max_len >= T, f"系列長 {T} が max_len={self.max_len} を超えています"
        x = self.drop(self.tok_emb(idx) + self.position(0, T))  # (B, T, d_model)
        mask = self.mask[:T, :T]  # (T, T): the model never sees the future
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


@contextlib.contextmanager
def ablate_heads(model, heads):
    """Switch heads off inside the ``with`` body: ``heads = {block index: [head, ...]}``.

    A head's output is zeroed where the heads are concatenated, just before ``W_o``; this works
    for any attention module with ``W_o`` and ``n_heads`` (the reader's too).
    """
    handles = []
    for i, hs in heads.items():
        attn = model.blocks[i].attn
        d_head = attn.W_o.in_features // attn.n_heads

        def zero(module, args, hs=tuple(hs), d_head=d_head):
            x = args[0].clone()  # (B, T, d_model): the heads side by side
            for h in hs:
                x[..., h * d_head:(h + 1) * d_head] = 0
            return (x,)

        handles.append(attn.W_o.register_forward_pre_hook(zero))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


# =======================================================================================
# Generation with a KV cache


def block_forward_cached(block, x, cache):
    """One Pre-LN block on the new positions x (B, T_new, d) given the cached keys/values.

    The same computation as ``TransformerBlock.forward`` in eval mode, but the keys and values
    of earlier positions come from ``cache`` (a dict filled here) instead of being recomputed.
    It uses only the parts the exercise fixes (ln1, attn.W_q/W_k/W_v/W_o, ln2, ff), so it runs
    on the reader's block as well.
    """
    attn = block.attn
    B, T_new, d_model = x.shape
    H = attn.n_heads
    d_head = d_model // H

    def split(t):  # (B, T, d_model) -> (B, H, T, d_head)
        return t.view(B, -1, H, d_head).transpose(1, 2)

    h = block.ln1(x)
    q, k, v = split(attn.W_q(h)), split(attn.W_k(h)), split(attn.W_v(h))
    if "k" in cache:
        k = torch.cat([cache["k"], k], dim=2)  # (B, H, T_past + T_new, d_head)
        v = torch.cat([cache["v"], v], dim=2)
    cache["k"], cache["v"] = k, v
    T_all = k.size(2)
    # Query i (absolute position T_all - T_new + i) may see keys 0 .. T_all - T_new + i: the causal
    # mask aligned to the bottom right. (is_causal=True would align it top left: wrong here.)
    mask = torch.ones(T_new, T_all, dtype=torch.bool, device=x.device).tril(T_all - T_new)
    out, _ = scaled_dot_product_attention(q, k, v, mask)
    x = x + attn.W_o(out.transpose(1, 2).reshape(B, T_new, d_model))
    return x + block.ff(block.ln2(x))


def supports_kv_cache(model) -> bool:
    """The cached path reproduces Pre-LN blocks only (a Post-LN block orders its parts differently)."""
    return isinstance(model, CausalTransformerLM) and all(
        not isinstance(b, PostLNBlock) and all(hasattr(b, n) for n in ("ln1", "attn", "ln2", "ff"))
        for b in model.blocks)


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, temperature=0.0, generator=None, use_cache=True):
    """Extend (B, T) ids greedily (``temperature`` = 0) or by sampling from softmax(logits / temperature).

    With ``use_cache`` (and a sequence that fits in ``max_len``), each step feeds only the new
    token and reuses the keys and values of the earlier ones (a KV cache); otherwise each step
    runs the model on the whole (last ``max_len`` tokens of the) sequence again.
    """
    was_training = model.training
    model.eval()
    idx = prompt_ids
    cached = use_cache and supports_kv_cache(model) and prompt_ids.size(1) + max_new_tokens <= model.max_len
    caches = [{} for _ in model.blocks]
    new = idx  # the tokens the model has not seen yet
    for _ in range(max_new_tokens):
        if cached:
            start = idx.size(1) - new.size(1)
            x = model.tok_emb(new) + model.position(start, new.size(1))
            for block, cache in zip(model.blocks, caches, strict=True):
                x = block_forward_cached(block, x, cache)
            logits = model.head(model.ln_f(x[:, -1]))  # (B, vocab)
        else:
            logits = model(idx[:, -model.max_len:])[:, -1]  # (B, vocab)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
        new = nxt
    model.train(was_training)
    return idx


# =======================================================================================
# Data: a generated corpus of additions such as "37+85=122"


@dataclass
class AdditionCorpus:
    chars: list[str]
    train_ids: torch.Tensor  # (N_train,) int64, every training line concatenated
    val_ids: torch.Tensor  # (N_val,) int64, lines whose pair occurs in training in neither order
    val_pairs: list[tuple[int, int]]
    max_operand: int
    reverse_sum: bool = False  # the sum written least significant digit first ("37+85=221")

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def newline(self) -> int:
        return self.chars.index("\n")

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.chars.index(c) for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def make_addition_corpus(max_operand=99, val_fraction=0.2, train_repeats=4, seed=0,
                         reverse_sum=False) -> AdditionCorpus:
    """Every sum a+b with 0 <= a, b <= max_operand, one per line, split into train and validation.

    The split is over unordered pairs {a, b}: a held-out pair is held out in both orders, so no
    validation sum can be answered by having seen its commuted twin. The training stream repeats
    the training lines ``train_repeats`` times, each time in a new random order, so that a random
    window sees many different neighbours. ``reverse_sum`` writes each sum's digits in reverse.
    """
    rng = random.Random(seed)
    n = max_operand + 1
    unordered = [(a, b) for a in range(n) for b in range(a, n)]
    rng.shuffle(unordered)
    n_val = round(len(unordered) * val_fraction)

    def both_orders(ps):
        return [(a, b) for a, b in ps] + [(b, a) for a, b in ps if a != b]

    val_pairs, train_pairs = both_orders(unordered[:n_val]), both_orders(unordered[n_val:])
    rng.shuffle(val_pairs)
    chars = list("0123456789+=\n")

    def stream(ps, repeats):
        lines = []
        for _ in range(repeats):
            ps = ps[:]
            rng.shuffle(ps)
            lines += [f"{a}+{b}={answer_text(a + b, reverse_sum)}\n" for a, b in ps]
        return "".join(lines)

    def ids(text):
        return torch.tensor([chars.index(c) for c in text], dtype=torch.long)

    return AdditionCorpus(chars, ids(stream(train_pairs, train_repeats)), ids(stream(val_pairs, 1)),
                          val_pairs, max_operand, reverse_sum)


def answer_text(total, reverse=False):
    """How a sum is written in the corpus: '122', or '221' with ``reverse``."""
    return str(total)[::-1] if reverse else str(total)


def get_batch(ids, batch_size, block_size, generator=None, device="cpu"):
    """Random windows: x = ids[i : i+T], y = ids[i+1 : i+T+1], both (B, T)."""
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)
    x = torch.stack([ids[s:s + block_size] for s in starts])
    y = torch.stack([ids[s + 1:s + block_size + 1] for s in starts])
    return x.to(device), y.to(device)


def lines_with_context(ids, newline, max_lines=None):
    """Each complete line as (x, y): x = newline + line[:-1], y = line (the newline included).

    So every character of a line is predicted with the whole line before it in view, and
    nothing from the line before (which says nothing about this one).
    """
    ends = (ids == newline).nonzero().flatten().tolist()
    starts = [0, *[e + 1 for e in ends[:-1]]]
    pairs = []
    for s, e in zip(starts, ends, strict=True):
        line = ids[s:e + 1]
        pairs.append((torch.cat([ids.new_tensor([newline]), line[:-1]]), line))
    return pairs[:max_lines]


@torch.no_grad()
def evaluate_loss(model, corpus, device="cpu", max_lines=None):
    """Mean next-character cross-entropy (nats) over the validation lines, each with its whole line as context."""
    was_training = model.training
    model.eval()
    by_length: dict[int, list] = {}
    for x, y in lines_with_context(corpus.val_ids, corpus.newline, max_lines):
        by_length.setdefault(len(x), []).append((x, y))
    total, count = 0.0, 0
    for group in by_length.values():
        x = torch.stack([p[0] for p in group]).to(device)
        y = torch.stack([p[1] for p in group]).to(device)
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


def train_lm(model, corpus, steps, batch_size, block_size, lr, device="cpu", eval_every=100,
             eval_lines=500, seed=0, log=print, warmup_steps=None, clip_norm=1.0, weight_decay=0.01):
    """AdamW, a linear warm-up then cosine decay of the learning rate; returns the loss history.

    ``warmup_steps``: steps of the linear warm-up (default: 5 % of ``steps``; 0 switches it off).
    ``clip_norm``: the largest global gradient norm (None switches clipping off).
    """
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps

    def lr_factor(s):  # s = 0, 1, ...: the factor of the step about to be taken
        cosine = 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
        return min((s + 1) / warmup, cosine) if warmup > 0 else cosine

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(seed)
    history = {"step": [], "lr": [], "train_loss": [], "grad_norm": [], "val_step": [], "val_loss": []}
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = get_batch(corpus.train_ids, batch_size, block_size, gen, device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = float("inf") if clip_norm is None else clip_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # the norm before clipping
        history["lr"].append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        history["step"].append(step)
        history["train_loss"].append(loss.item())
        history["grad_norm"].append(grad_norm.item())
        if step % eval_every == 0 or step == steps:
            val = evaluate_loss(model, corpus, device, max_lines=eval_lines)
            history["val_step"].append(step)
            history["val_loss"].append(val)
            if log:
                log(f"step {step:5d}  学習損失 {loss.item():.3f}  検証損失 {val:.3f}  "
                    f"({time.perf_counter() - start:.0f} 秒)")
    history["seconds"] = time.perf_counter() - start
    return history


def bigram_perplexity(corpus, smoothing=1.0):
    """Validation perplexity of a count-based bigram model (add-``smoothing``) fit on train.

    Scored on the same (x, y) pairs as ``evaluate_loss``: each line's first character is
    predicted from the newline before it.
    """
    V = corpus.vocab_size
    counts = torch.full((V, V), float(smoothing))
    counts.index_put_((corpus.train_ids[:-1], corpus.train_ids[1:]), torch.ones(len(corpus.train_ids) - 1),
                      accumulate=True)
    logp = (counts / counts.sum(1, keepdim=True)).log()
    pairs = lines_with_context(corpus.val_ids, corpus.newline)
    x = torch.cat([p[0] for p in pairs])
    y = torch.cat([p[1] for p in pairs])
    return math.exp(-logp[x, y].mean().item())


def ideal_perplexity(corpus, knows_held_out_pairs=False):
    """Perplexity of an ideal model on the validation lines under ``evaluate_loss``.

    The ideal model knows the rule, and a line is fixed by its pair (a, b): it pays exactly
    -ln P(a, b) nats for the whole line, whatever the split into characters (the operands'
    digits carry the surprise; '+', '=', the sum and the newline cost nothing).
    - Default: every pair equally likely, as in the process that generated the data: that is
      ln((max_operand+1)^2) per line, the value a model that learned the rule (and nothing about
      the split) reaches.
    - ``knows_held_out_pairs``: the model also knows which pairs were held out, so it spreads its
      bet over those alone: ln(len(val_pairs)) per line. Since every validation line is distinct and
      is predicted from a newline alone, the probabilities any causal model gives them sum to at most
      1, so by Gibbs' inequality no such model does better: only a model that sees ahead (or a broken
      evaluation) goes below this floor.
    """
    n_lines = int((corpus.val_ids == corpus.newline).sum())
    pairs = len(corpus.val_pairs) if knows_held_out_pairs else (corpus.max_operand + 1) ** 2
    return math.exp(n_lines * math.log(pairs) / len(corpus.val_ids))


@torch.no_grad()
def window_loss(model, ids, block_size, device="cpu", n_windows=256, seed=0):
    """Mean next-character cross-entropy over random windows, cut the way training cuts them.

    A window that starts inside a line lacks that line's beginning, so even the ideal model pays
    more here than under ``evaluate_loss``; the floor ``ideal_perplexity(knows_held_out_pairs=True)``
    still holds (up to the few lines a window has already seen) for any model that cannot see ahead.
    """
    was_training = model.training
    model.eval()
    x, y = get_batch(ids, n_windows, block_size, torch.Generator().manual_seed(seed), device)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    model.train(was_training)
    return loss


@torch.no_grad()
def addition_accuracy(model, corpus, n=500, device="cpu"):
    """Share of held-out sums (neither order seen in training) that greedy decoding gets exactly right."""
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
            expected = answer_text(a + b, corpus.reverse_sum)
            ok = text == expected
            correct += ok
            if len(examples) < 8:
                examples.append(f"{a}+{b}={text}" + ("" if ok else f"  （正解 {expected}）"))
    return correct / len(pairs), examples


# =======================================================================================
# Pre-LN and Post-LN at initialisation


def _fresh_lm(block_cls, depth, seed, device, d_model, n_heads, vocab, T, batch):
    torch.manual_seed(seed)
    m = CausalTransformerLM(vocab, d_model, n_heads, depth, 4 * d_model, T, block_cls=block_cls).to(device)
    return m, torch.randint(vocab, (batch, T + 1), device=device)


def init_gradient_norms(block_cls, depth, seeds=(0, 1, 2), device="cpu", d_model=64, n_heads=4, vocab=16, T=64,
                        batch=8):
    """Gradient norm of every block of a freshly initialised LM after one backward pass on random tokens.

    Returns a (len(seeds), depth) tensor: one row per seed, one column per block (input side first).
    """
    rows = []
    for seed in seeds:
        m, idx = _fresh_lm(block_cls, depth, seed, device, d_model, n_heads, vocab, T, batch)
        F.cross_entropy(m(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
        rows.append(block_gradient_norms(m))
    return torch.tensor(rows)


@torch.no_grad()
def init_residual_std(block_cls, depth, seeds=(0, 1, 2), device="cpu", d_model=64, n_heads=4, vocab=16, T=64,
                      batch=8):
    """Standard deviation of the residual stream of a freshly initialised LM, same set-up as above.

    Returns a (len(seeds), depth + 1) tensor: the embeddings, then the output of every block.
    """
    rows = []
    for seed in seeds:
        m, idx = _fresh_lm(block_cls, depth, seed, device, d_model, n_heads, vocab, T, batch)
        with record_outputs({"emb": m.drop, **{str(i): b for i, b in enumerate(m.blocks)}}) as out:
            m(idx[:, :-1])
        rows.append([out["emb"].std().item()] + [out[str(i)].std().item() for i in range(depth)])
    return torch.tensor(rows)


# =======================================================================================
# Naive attention against F.scaled_dot_product_attention


@torch.no_grad()
def benchmark_attention(lengths, batch=1, heads=8, d_head=64, device="cpu", dtype=torch.float32,
                        repeats=5, attention=scaled_dot_product_attention):
    """Causal attention: ``attention`` (the naive one of exercise 1) vs ``F.scaled_dot_product_attention``.

    The fused side gets ``is_causal=True`` and no mask tensor (an explicit ``attn_mask`` rules
    out the FlashAttention kernel on a GPU). Returns one dict per length: times (ms), peak
    memory (MiB), speed-up, max difference.
    """
    rows = []
    for T in lengths:
        q, k, v = (torch.randn(batch, heads, T, d_head, device=device, dtype=dtype) for _ in range(3))
        mask = causal_mask(T, device=device)
        naive = functools.partial(attention, q, k, v, mask)
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
