"""Chapter 8: a DARTS search at a CPU size finds a cell whose network, retrained from scratch, beats
chance (10 %) by a wide margin on the shifted digits, and the search moves the alphas off uniform.

Measured on the 2-core AMD EPYC (one thread, the channels-last layout of darts.memory_layout): this
4-epoch search takes about 55 s alone, the mean entropy of the normal cell's edges falls 2.079 → 2.069, and
its cell retrained for 10 epochs (10 s) reaches 0.675 test accuracy (the chapter's 15-epoch searches
retrained for 20 epochs: 0.74–0.85, see solutions/data/darts_retrain.csv).
"""

import math

import torch

from solutions import darts


def test_searched_cell_retrained_beats_chance_widely():
    data = darts.shifted_digits_splits(0)
    cfg = darts.SearchConfig(c=8, layers=3, steps=4, epochs=4, batch_size=64, alpha_lr=1e-2, seed=0)
    out = darts.search(cfg, data)
    history = out["history"]
    assert len(history["genotype"]) == cfg.epochs
    entropy = torch.stack(history["entropy_normal"]).mean(1)
    assert entropy[-1] < entropy[0] < math.log(len(darts.PRIMITIVES))     # the alphas leave uniform
    genotype = out["genotype"]
    assert all(name != "none" for name, _ in genotype.normal + genotype.reduce)
    result = darts.train_discrete(genotype, seed=0, epochs=10, data=data)
    assert result["test_acc"] >= 0.5, result["test_acc"]
