"""The chapter's language model really learns (fixed seeds, a CPU-sized run), and the data and
the bounds it is compared with mean what the chapter says."""

import math

import pytest
import torch

from solutions import transformer as tr


@pytest.fixture(scope="module")
def corpus():
    return tr.make_addition_corpus()


def test_validation_sums_are_unseen_in_both_orders(corpus):
    train_lines = set(corpus.decode(corpus.train_ids).split("\n")) - {""}
    val_lines = set(corpus.decode(corpus.val_ids).split("\n")) - {""}
    assert len(train_lines) + len(val_lines) == 100 * 100 and not (train_lines & val_lines)
    commuted = {f"{b}+{a}={a + b}" for a, b in corpus.val_pairs}
    assert not (commuted & train_lines)
    operands = {tuple(map(int, line.split("=")[0].split("+"))) for line in val_lines}
    assert set(corpus.val_pairs) == operands
    assert 1900 < len(val_lines) < 2100


def test_lines_with_context_cover_every_character_once(corpus):
    pairs = tr.lines_with_context(corpus.val_ids, corpus.newline)
    assert torch.equal(torch.cat([y for _, y in pairs]), corpus.val_ids)
    for x, y in pairs[:50]:
        assert x[0] == corpus.newline and torch.equal(x[1:], y[:-1]) and y[-1] == corpus.newline


def test_ideal_perplexity_is_what_the_ideal_model_pays(corpus):
    """Brute force on a small corpus: the Bayes-optimal next-character model given the line so far."""
    small = tr.make_addition_corpus(max_operand=9, seed=1)
    all_lines = [f"{a}+{b}={a + b}\n" for a in range(10) for b in range(10)]
    total = count = 0.0
    for _, y in tr.lines_with_context(small.val_ids, small.newline):
        line = small.decode(y)
        for i in range(len(line)):
            prefix = line[:i]
            matching = [s for s in all_lines if s.startswith(prefix)]
            p = sum(s[i] == line[i] for s in matching) / len(matching)
            total -= math.log(p)
            count += 1
    assert math.exp(total / count) == pytest.approx(tr.ideal_perplexity(small), rel=1e-9)
    # The floor: a model that also knows which pairs were held out bets on those alone.
    held_out = [f"{a}+{b}={a + b}\n" for a, b in small.val_pairs]
    total = count = 0.0
    for _, y in tr.lines_with_context(small.val_ids, small.newline):
        line = small.decode(y)
        for i in range(len(line)):
            matching = [s for s in held_out if s.startswith(line[:i])]
            total -= math.log(sum(s[i] == line[i] for s in matching) / len(matching))
            count += 1
    assert math.exp(total / count) == pytest.approx(tr.ideal_perplexity(small, knows_held_out_pairs=True), rel=1e-9)
    assert tr.ideal_perplexity(small, knows_held_out_pairs=True) < tr.ideal_perplexity(small)
    assert 2.5 < tr.ideal_perplexity(corpus) < 3.0 < 9 < tr.bigram_perplexity(corpus) < 11


def test_reversed_sums_are_written_and_graded_reversed():
    rev = tr.make_addition_corpus(reverse_sum=True)
    line = rev.decode(rev.val_ids).split("\n")[0]
    a, b = map(int, line.split("=")[0].split("+"))
    assert line.split("=")[1] == str(a + b)[::-1]

    class Oracle(torch.nn.Module):  # a "model" that always puts all its mass on the right next character
        max_len, blocks = 64, []

        def forward(self, idx):
            logits = torch.full((*idx.shape, rev.vocab_size), -1e4)
            for i, row in enumerate(idx):
                text = rev.decode(row)
                line = text.split("\n")[-1]
                if "=" in line:
                    x, y = map(int, line.split("=")[0].split("+"))
                    done = line.split("=")[1]
                    full = tr.answer_text(x + y, reverse=True) + "\n"
                    logits[i, -1, rev.chars.index(full[len(done)])] = 0
            return logits

    accuracy, _ = tr.addition_accuracy(Oracle(), rev, n=20)
    assert accuracy == 1.0
    plain = tr.make_addition_corpus()
    assert tr.addition_accuracy(Oracle(), plain, n=20)[0] < 0.5  # reversed answers are wrong for plain sums


def test_warm_up_and_clipping_switches(corpus):
    def run(**kw):
        torch.manual_seed(0)
        model = tr.CausalTransformerLM(corpus.vocab_size, 16, 2, 1, 32, 32)
        return tr.train_lm(model, corpus, 20, 8, 16, 1e-2, eval_every=20, eval_lines=20, log=None, **kw)

    warm, cold = run(), run(warmup_steps=0)
    assert warm["lr"][0] == pytest.approx(1e-2 / 1) and warm["lr"][1] < 1e-2  # 20 // 20 = 1 warm-up step
    assert run(warmup_steps=10)["lr"][:3] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert cold["lr"][0] == pytest.approx(1e-2) and cold["lr"][-1] < cold["lr"][0]
    assert all(g > 0 for g in cold["grad_norm"])


def test_lm_beats_the_bigram_baseline_and_learns_to_add(corpus):
    torch.manual_seed(0)
    model = tr.CausalTransformerLM(corpus.vocab_size, 64, 4, 2, 256, 64)
    history = tr.train_lm(model, corpus, steps=1500, batch_size=64, block_size=32, lr=3e-3, eval_every=1500,
                          log=None)
    ppl = math.exp(tr.evaluate_loss(model, corpus))
    assert history["train_loss"][-1] < history["train_loss"][0] / 1.5
    assert ppl < 0.5 * tr.bigram_perplexity(corpus), ppl
    assert ppl > tr.ideal_perplexity(corpus)  # the ideal model is not beaten on unseen sums
    accuracy, _ = tr.addition_accuracy(model, corpus, n=300)
    assert accuracy > 0.05, accuracy  # random guessing of a 2-3 digit sum is well below 1 %


def test_a_model_that_sees_the_future_goes_below_the_floor(corpus):
    """What section 9 shows: without the causal mask the loss drops below what any honest model can reach."""
    floor = math.log(tr.ideal_perplexity(corpus, knows_held_out_pairs=True))
    losses = {}
    for causal in (True, False):
        torch.manual_seed(0)
        m = tr.CausalTransformerLM(corpus.vocab_size, 32, 4, 1, 128, 64)
        if not causal:
            m.mask.fill_(True)
        tr.train_lm(m, corpus, 600, 32, 32, 3e-3, eval_every=600, eval_lines=10, log=None)
        losses[causal] = tr.window_loss(m, corpus.val_ids, 32)
    assert losses[False] < 0.5 * floor < floor < losses[True], losses
