"""Chapter 9's search really learns, and the stored comparison the chapter reads is what the code makes.

The stored reference (solutions/data/hpo_runs.csv, ``python -m solutions.hpo reference``) is
checked twice: one of its searches is run again here and must match it row by row within what another CPU's
rounding changes (one thread, fixed seeds), and the claims the chapter makes from it are asserted on it.
"""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch

from solutions import hpo

optuna.logging.set_verbosity(optuna.logging.WARNING)
TARGET = 0.97                       # the chapter's target validation accuracy


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stored():
    rows = hpo.read_runs()
    return {(s, p): hpo.select(rows, sampler=s, pruner=p) for s, p in hpo.REFERENCE["searches"]}


def test_one_stored_search_is_reproduced(one_thread, stored):
    cfg = hpo.REFERENCE
    seed = 3
    rows = hpo.run_search("tpe", "hyperband", seed, cfg["n_trials"], hpo.digits_splits(cfg["n_train"], cfg["n_val"]),
                          cfg["epochs"])
    assert rows[-1]["best"] >= TARGET            # the search learns: chance is 0.1, a dead learning rate stays there
    assert sum(r["state"] == "PRUNED" for r in rows) >= 10
    saved = stored[("tpe", "hyperband")][cfg["seeds"].index(seed)]
    # Row by row, up to the CPU. On the machine that made the record the rerun is identical (one thread, fixed
    # seeds); another instruction set rounds 15 epochs of training differently (seen on an AMD EPYC with AVX2:
    # completed values within 0.015, 6 of the 400 validation images, and from trial 29 on a borderline pruning
    # decision went the other way, which changes what TPE proposes next). So: the seeded start-up trials end the
    # same way, every trial completed in both has the same value within 0.02, and the outcome is the record's.
    keys = ("trial", "state", "epochs")
    assert len(rows) == len(saved)
    startup = 10
    assert [tuple(r[k] for k in keys) for r in rows[:startup]] == [tuple(r[k] for k in keys) for r in saved[:startup]]
    for a, b in zip(rows, saved, strict=True):
        if a["value"] is not None and b["value"] is not None:
            assert abs(a["value"] - b["value"]) < 0.02, (a, b)
    assert abs(rows[-1]["best"] - saved[-1]["best"]) < 0.01
    pruned = [sum(r["state"] == "PRUNED" for r in x) for x in (rows, saved)]
    assert abs(pruned[0] - pruned[1]) <= 5, pruned


def test_stored_reference_is_complete(stored):
    cfg = hpo.REFERENCE
    for key, seed_runs in stored.items():
        assert len(seed_runs) == len(cfg["seeds"]), key
        assert all(len(r) == cfg["n_trials"] for r in seed_runs), key
        for r in seed_runs:
            done = [x for x in r if x["state"] == "COMPLETE"]
            assert all(x["epochs"] == cfg["epochs"] for x in done)
            assert abs(r[-1]["best"] - max(x["value"] for x in done)) < 1e-9


def test_tpe_beats_random_search_in_the_stored_runs(stored):
    """The chapter's section 5: the same first 10 trials; then TPE reaches the target in every seed."""
    tpe = stored[("tpe", "none")]
    rnd = stored[("random", "none")]
    for a, b in zip(tpe, rnd, strict=True):         # TPE's start-up trials are its seeded RandomSampler's
        assert [x["value"] for x in a[:10]] == [x["value"] for x in b[:10]]
    reached_tpe = [hpo.first_reaching(r, TARGET) for r in tpe]
    reached_rnd = [hpo.first_reaching(r, TARGET) for r in rnd]
    assert None not in reached_tpe and 15 <= np.mean(reached_tpe) <= 25
    assert sum(n is not None for n in reached_rnd) <= 3
    assert all(n <= 10 for n in reached_rnd if n is not None)
    final_tpe = np.mean([r[-1]["best"] for r in tpe])
    final_rnd = np.mean([r[-1]["best"] for r in rnd])
    assert 0.005 <= final_tpe - final_rnd <= 0.02


def test_pruning_saves_epochs_in_the_stored_runs(stored):
    """The chapter's section 6: the median rule saves a third and changes one seed by one image;
    Hyperband saves half and loses a little in most seeds."""
    full = hpo.REFERENCE["n_trials"] * hpo.REFERENCE["epochs"]
    base = [r[-1]["best"] for r in stored[("tpe", "none")]]

    def summary(pruner):
        runs = stored[("tpe", pruner)]
        saved = 1 - np.mean([sum(x["epochs"] for x in r) for r in runs]) / full
        diff = np.array([r[-1]["best"] - b for r, b in zip(runs, base, strict=True)])
        return saved, diff

    saved, diff = summary("median")
    assert 0.25 <= saved <= 0.40
    assert (np.abs(diff) < 1e-9).sum() == 9 and diff.min() > -0.003
    saved, diff = summary("hyperband")
    assert 0.45 <= saved <= 0.55
    assert (diff < -1e-9).sum() == 6 and diff.min() > -0.008 and diff.mean() < 0
