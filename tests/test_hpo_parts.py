"""Chapter 9's parts against Optuna itself and against hand-worked cases."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from solutions import hpo

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def data():
    return hpo.digits_splits(n_train=120, n_val=80)


def test_digits_splits_are_disjoint_and_cover_the_data():
    (xa, ya), (xb, yb), (xc, yc) = hpo.digits_splits(n_train=500, n_val=400)
    assert (len(ya), len(yb), len(yc)) == (500, 400, 897)
    rows = torch.cat([xa, xb, xc])
    assert rows.shape == (1797, 64) and float(rows.min()) >= 0.0 and float(rows.max()) <= 1.0
    from sklearn.datasets import load_digits

    assert torch.cat([ya, yb, yc]).bincount().tolist() == np.bincount(load_digits().target).tolist()


def test_digits_read_without_sklearn_are_sklearns_digits():
    """The workers read the digits from the CSV file scikit-learn ships (no import of scikit-learn): the
    same numbers, in the same order, as load_digits, and scikit-learn is not imported on the way."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    x, y = hpo._digits_arrays()
    ref_x, ref_y = load_digits(return_X_y=True)
    assert x.dtype == ref_x.dtype and y.dtype == ref_y.dtype
    assert np.array_equal(x, ref_x) and np.array_equal(y, ref_y)
    code = "import sys; from solutions import hpo; hpo.digits_splits(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(hpo.__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_reference_objective_suggests_the_table_and_trains_with_every_value():
    seen = []

    def spy(config):
        seen.append(dict(config))
        yield {"epoch": 1, "val_loss": 1.0, "val_acc": 0.5}

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(hpo.make_objective(spy), n_trials=5)
    for t, config in zip(study.trials, seen, strict=True):
        assert t.distributions == hpo.search_space_distributions()
        assert config == t.params
    lr = optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)
    assert hpo.search_space_distributions()["learning_rate"] == lr
    assert hpo.search_space_distributions()["hidden_dim"] == optuna.distributions.IntDistribution(64, 512, step=64)


def test_every_hyperparameter_changes_the_training(data):
    base = {"learning_rate": 3e-3, "batch_size": 32, "optimizer": "adam", "weight_decay": 1e-4,
            "dropout": 0.2, "hidden_dim": 64, "num_layers": 2}
    run = [m["val_loss"] for m in hpo.train_mlp(base, data, 2)]
    assert run == [m["val_loss"] for m in hpo.train_mlp(base, data, 2)]          # deterministic
    changes = {"learning_rate": 1e-2, "batch_size": 16, "optimizer": "adamw", "weight_decay": 1e-2,
               "dropout": 0.4, "hidden_dim": 128, "num_layers": 3}
    for name, value in changes.items():
        other = [m["val_loss"] for m in hpo.train_mlp({**base, name: value}, data, 2)]
        assert other != run, f"{name} does not change the training"
    model = hpo.MLP(64, 5, 0.1)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 6
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in model.modules()) == 5


def test_training_stops_when_the_caller_stops_asking(data):
    config = {"learning_rate": 1e-2, "batch_size": 64, "optimizer": "sgd", "weight_decay": 1e-4,
              "dropout": 0.1, "hidden_dim": 64, "num_layers": 2}
    gen = hpo.train_mlp(config, data, 50)
    first = next(gen)
    assert first["epoch"] == 1
    gen.close()                                      # a pruned trial: no further epoch is computed


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_best_so_far_agrees_with_optuna_best_value(direction):
    rng = np.random.default_rng(1)
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.RandomSampler(seed=0))
    expected = []

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        r = rng.random()
        if r < 0.2:
            raise ValueError("a failed trial")
        trial.report(x, 1)
        if r < 0.35:
            raise optuna.TrialPruned()
        return x

    for _ in range(30):
        study.optimize(objective, n_trials=1, catch=(ValueError,))
        try:
            expected.append(study.best_value)
        except ValueError:                        # no complete trial yet
            expected.append(math.nan)
    done = optuna.trial.TrialState.COMPLETE
    values = [t.value if t.state == done else None for t in study.trials]
    assert any(v is None for v in values) and any(v is not None for v in values)
    got = hpo.best_so_far(values, direction)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert (math.isnan(g) and math.isnan(e)) or g == e
    assert hpo.best_so_far(values, study.direction) == got      # the enum is accepted too
    with pytest.raises(ValueError, match="direction"):
        hpo.best_so_far([1.0], "up")


@pytest.mark.parametrize("n", [7, 23, 40])
def test_tpe_split_matches_optuna(n):
    from optuna.samplers._tpe.sampler import _split_trials, default_gamma

    rng = np.random.default_rng(n)
    values = rng.permutation(n).astype(float) / n
    study = optuna.create_study(direction="maximize")
    for i, v in enumerate(values):
        study.add_trial(optuna.trial.create_trial(params={"x": float(i)}, value=float(v),
                                                  distributions={"x": optuna.distributions.FloatDistribution(0, n)}))
    below, above = _split_trials(study, study.trials, default_gamma(n))
    good, rest = hpo.tpe_split(list(values), gamma=0.1, direction="maximize")
    assert good == [t.number for t in below] and rest == [t.number for t in above]
    good_min, _ = hpo.tpe_split(list(values), gamma=0.1, direction="minimize")
    assert good_min == sorted(np.argsort(values)[: len(good)].tolist())


def test_parzen_is_a_density_and_matches_scipy():
    from scipy.stats import norm

    points = [-3.0, -2.5, -1.2]
    grid = np.linspace(-8, 4, 4001)
    density = hpo.parzen(points, grid, bandwidth=0.3)
    assert abs(np.trapezoid(density, grid) - 1.0) < 1e-6
    expected = np.mean([norm.pdf(grid, loc=p, scale=0.3) for p in points], axis=0)
    np.testing.assert_allclose(density, expected, rtol=1e-10, atol=1e-14)


def test_run_search_rows_and_pruning_epochs(data):
    rows = hpo.run_search("tpe", "median", 0, 12, data, 4)
    assert [r["trial"] for r in rows] == list(range(12))
    assert all(1 <= r["epochs"] <= 4 for r in rows)
    assert all(r["epochs"] == 4 for r in rows if r["state"] == "COMPLETE")
    assert all(r["value"] is None for r in rows if r["state"] != "COMPLETE")
    best = [r["best"] for r in rows]
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(best))
    assert hpo.first_reaching(rows, best[-1]) == next(i + 1 for i, b in enumerate(best) if b >= best[-1])
    assert hpo.first_reaching(rows, 1.01) is None


def test_runs_csv_round_trip(tmp_path, data):
    rows = hpo.run_search("random", "none", 1, 3, data, 1)
    hpo.write_runs(tmp_path / "runs.csv", rows)
    back = hpo.read_runs(tmp_path / "runs.csv")
    keys = ("trial", "state", "epochs")
    assert [tuple(r[k] for k in keys) for r in back] == [tuple(r[k] for k in keys) for r in rows]
    assert all(abs(a["value"] - b["value"]) < 1e-5 for a, b in zip(back, rows, strict=True))


def test_evaluate_on_test_repeats_the_trial(data):
    study = hpo.make_study(seed=0)
    study.optimize(hpo.make_objective(hpo.make_train_fn(data, 3)), n_trials=2)
    best = hpo.evaluate_on_test(study.best_params, data, 3)
    assert best["val_acc"] == pytest.approx(study.best_value, abs=1e-9)
    assert 0.0 <= best["test_acc"] <= 1.0


def test_same_seed_proposes_the_same_start_up_configs():
    """The chapter's claim: a sampler re-created with the same seed repeats its random start-up trials."""
    def first_params(seed):
        study = hpo.make_study(seed=seed)
        study.optimize(hpo.make_objective(lambda config: iter([{"epoch": 1, "val_acc": 0.5, "val_loss": 1.0}])),
                       n_trials=3)
        return [t.params for t in study.trials]

    assert first_params(0) == first_params(0)
    assert first_params(0) != first_params(1)


def test_evaluate_on_test_evaluates_the_best_epochs_weights(data):
    config = {"learning_rate": 3e-3, "batch_size": 32, "optimizer": "adam", "weight_decay": 1e-5,
              "dropout": 0.1, "hidden_dim": 64, "num_layers": 2}
    best = hpo.evaluate_on_test(config, data, 6)
    accs = [m["val_acc"] for m in hpo.train_mlp(config, data, 6)]
    assert best["epoch"] == int(np.argmax(accs)) + 1 and best["val_acc"] == max(accs)
    *_, (model, _) = hpo._training(config, data, best["epoch"], 0, "cpu")     # the weights after that epoch
    x, y = data[2]
    model.eval()
    with torch.no_grad():
        expected = (model(x).argmax(-1) == y).float().mean().item()
    assert best["test_acc"] == pytest.approx(expected, abs=1e-12)


def test_heartbeat_storage_uses_the_current_retry_callback(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)             # deprecated names warn with FutureWarning
        storage = hpo.storage_for(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat=True)
    assert isinstance(storage.heartbeat_stale_trial_callback, optuna.storages.RetryHeartbeatStaleTrialCallback)
    assert storage.get_heartbeat_interval() == 1
    storage.engine.dispose()


def test_relabel_replaces_optunas_english_labels():
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + 0.1 * t.suggest_int("n", 1, 3), n_trials=8)
    with plt.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for ax in (ovm.plot_optimization_history(study), ovm.plot_param_importances(study),
                   ovm.plot_parallel_coordinate(study), ovm.plot_contour(study, params=["x", "n"])):
            hpo.relabel(ax, "日本語のタイトル")
            texts = [ax.get_title(loc="left"), ax.get_title()]
            for a in ax.figure.axes:
                texts += [a.get_xlabel(), a.get_ylabel(), *(t.get_text() for t in a.get_xticklabels())]
                if a.get_legend() is not None:
                    texts += [t.get_text() for t in a.get_legend().get_texts()]
            assert ax.get_title() == "日本語のタイトル" and ax.get_title(loc="left") == ""
            assert not set(texts) & set(hpo.OPTUNA_LABELS), set(texts) & set(hpo.OPTUNA_LABELS)
            plt.close("all")
