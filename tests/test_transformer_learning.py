"""The chapter's language model really learns (fixed seeds, a CPU-sized run)."""

import math

import torch

from solutions import transformer as tr


def test_corpus_split_and_bounds():
    corpus = tr.make_addition_corpus()
    train_lines = set(corpus.decode(corpus.train_ids).split("\n"))
    val_lines = set(corpus.decode(corpus.val_ids).split("\n")) - {""}
    assert len(val_lines) == 2000 and not (train_lines & val_lines)
    assert 2.5 < tr.ideal_perplexity(corpus) < 3.0 < 9 < tr.bigram_perplexity(corpus) < 11


def test_lm_beats_the_bigram_baseline_and_learns_to_add():
    torch.manual_seed(0)
    corpus = tr.make_addition_corpus()
    model = tr.CausalTransformerLM(corpus.vocab_size, 64, 4, 2, 256, 64)
    history = tr.train_lm(model, corpus, steps=1500, batch_size=64, block_size=32, lr=3e-3, eval_every=1500, log=None)
    ppl = math.exp(tr.evaluate_loss(model, corpus.val_ids, 32))
    assert history["train_loss"][-1] < history["train_loss"][0] / 1.5
    assert ppl < 0.5 * tr.bigram_perplexity(corpus), ppl
    assert ppl > tr.ideal_perplexity(corpus)  # a causal model cannot beat the bound
    accuracy, _ = tr.addition_accuracy(model, corpus, n=300)
    assert accuracy > 0.05, accuracy  # random guessing of a 2-3 digit sum is well below 1 %
