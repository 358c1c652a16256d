"""Chapter 9's answer cases for the checker (used by tests/test_exercises.py).

``CORRECT``: answers written differently from the reference that must pass.
``WRONG``: the mistakes readers actually make, each with a phrase the verdict must contain.
"""

import itertools
import math
import warnings

import numpy as np
import optuna

# --------------------------------------------------------------------------- objective

_SPACE = [
    ("learning_rate", "float", (1e-5, 1e-1), {"log": True}),
    ("batch_size", "cat", ([16, 32, 64, 128],), {}),
    ("optimizer", "cat", (["adam", "sgd", "adamw"],), {}),
    ("weight_decay", "float", (1e-6, 1e-2), {"log": True}),
    ("dropout", "float", (0.1, 0.5), {}),
    ("hidden_dim", "int", (64, 512), {"step": 64}),
    ("num_layers", "int", (2, 8), {}),
]


def _suggest(trial, space=_SPACE):
    config = {}
    for name, kind, args, kwargs in space:
        suggest = {"float": trial.suggest_float, "int": trial.suggest_int, "cat": trial.suggest_categorical}[kind]
        config[name] = suggest(name, *args, **kwargs)
    return config


def objective_from_a_table(train_fn):
    """Correct: the space suggested from a table, steps from 0, reporting the running best."""

    def objective(trial):
        best = 0.0
        for epoch, metrics in enumerate(train_fn(_suggest(trial))):
            best = max(best, metrics["val_acc"])
            trial.report(best, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}")
        return best

    return objective


def objective_with_history(train_fn):
    """Correct: a reversed suggestion order, a list of accuracies, the step from the metrics."""

    def objective(trial):
        config = {
            "num_layers": trial.suggest_int("num_layers", 2, 8),
            "hidden_dim": trial.suggest_int("hidden_dim", 64, 512, step=64),
            "dropout": trial.suggest_float("dropout", 0.1, 0.5),
            "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
            "optimizer": trial.suggest_categorical("optimizer", ("adam", "sgd", "adamw")),
            "batch_size": trial.suggest_categorical("batch_size", (16, 32, 64, 128)),
            "learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-1, log=True),
        }
        history = []
        for metrics in train_fn(config):
            history.append(metrics["val_acc"])
            trial.report(history[-1], step=metrics["epoch"])
            if trial.should_prune():
                raise optuna.exceptions.TrialPruned()
        return max(history)

    return objective


def objective_reordered_choices(train_fn):
    """Correct: the categorical choices listed in another order, the learning rate suggested with the
    deprecated suggest_loguniform (the same distribution), steps from the metrics."""

    def objective(trial):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            lr = trial.suggest_loguniform("learning_rate", 1e-5, 1e-1)
        config = {
            "learning_rate": lr,
            "batch_size": trial.suggest_categorical("batch_size", [128, 64, 32, 16]),
            "optimizer": trial.suggest_categorical("optimizer", ["sgd", "adamw", "adam"]),
            "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
            "dropout": trial.suggest_float("dropout", 0.1, 0.5),
            "hidden_dim": trial.suggest_int("hidden_dim", 64, 512, step=64),
            "num_layers": trial.suggest_int("num_layers", 2, 8, step=1),
            "device": "cpu",                               # an extra key the training may use
        }
        best = -1.0
        for metrics in train_fn(config):
            trial.report(metrics["val_acc"], metrics["epoch"])
            best = max(best, metrics["val_acc"])
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    return objective


def objective_forgets_return(train_fn):
    """Wrong: no return statement, so every trial fails."""

    def objective(trial):
        for epoch, metrics in enumerate(train_fn(_suggest(trial)), start=1):
            trial.report(metrics["val_acc"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

    return objective


def objective_returns_last(train_fn):
    """Wrong: the last epoch's accuracy is returned."""

    def objective(trial):
        acc = 0.0
        for epoch, metrics in enumerate(train_fn(_suggest(trial)), start=1):
            acc = metrics["val_acc"]
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return acc

    return objective


def objective_reports_loss(train_fn):
    """Wrong: the loss is reported (pruning on it) while the accuracy is returned."""

    def objective(trial):
        best = 0.0
        for epoch, metrics in enumerate(train_fn(_suggest(trial)), start=1):
            best = max(best, metrics["val_acc"])
            trial.report(metrics["val_loss"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    return objective


def objective_reports_error(train_fn):
    """Wrong: the error rate reported and returned, as if the study minimised."""

    def objective(trial):
        best = 1.0
        for epoch, metrics in enumerate(train_fn(_suggest(trial)), start=1):
            err = 1.0 - metrics["val_acc"]
            best = min(best, err)
            trial.report(err, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    return objective


def objective_linear_lr(train_fn):
    """Wrong: the learning rate suggested on a linear scale."""
    space = [(n, k, a, ({} if n == "learning_rate" else kw)) for n, k, a, kw in _SPACE]

    def objective(trial):
        best = 0.0
        for epoch, metrics in enumerate(train_fn(_suggest(trial, space)), start=1):
            best = max(best, metrics["val_acc"])
            trial.report(metrics["val_acc"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    return objective


def objective_early_stopped_on_loss(train_fn):
    """Wrong (the seed listing's logic): the accuracy of the epoch with the lowest loss is returned."""

    def objective(trial):
        best_loss, acc_at_best = math.inf, 0.0
        for epoch, metrics in enumerate(train_fn(_suggest(trial)), start=1):
            trial.report(metrics["val_acc"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
            if metrics["val_loss"] < best_loss:
                best_loss, acc_at_best = metrics["val_loss"], metrics["val_acc"]
        return acc_at_best

    return objective


def objective_never_prunes(train_fn):
    """Wrong: reports but never asks the pruner."""

    def objective(trial):
        best = 0.0
        for epoch, metrics in enumerate(train_fn(_suggest(trial)), start=1):
            best = max(best, metrics["val_acc"])
            trial.report(metrics["val_acc"], epoch)
        return best

    return objective


def objective_breaks_instead(train_fn):
    """Wrong: a pruned trial stopped with break, so it is recorded as COMPLETE."""

    def objective(trial):
        best = 0.0
        for epoch, metrics in enumerate(train_fn(_suggest(trial)), start=1):
            best = max(best, metrics["val_acc"])
            trial.report(metrics["val_acc"], epoch)
            if trial.should_prune():
                break
        return best

    return objective


def objective_trains_everything_first(train_fn):
    """Wrong: every epoch computed before reporting, so pruning saves nothing."""

    def objective(trial):
        accs = [m["val_acc"] for m in train_fn(_suggest(trial))]
        for epoch, acc in enumerate(accs, start=1):
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return max(accs)

    return objective


def objective_drops_batch_size(train_fn):
    """Wrong (the seed listing's bug): batch_size suggested but not passed to the training."""

    def objective(trial):
        config = _suggest(trial)
        config.pop("batch_size")
        best = 0.0
        for epoch, metrics in enumerate(train_fn(config), start=1):
            best = max(best, metrics["val_acc"])
            trial.report(metrics["val_acc"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    return objective


def objective_hidden_as_categories(train_fn):
    """Wrong: hidden_dim as a categorical list instead of an integer range with step 64."""
    space = [(n, k, a, kw) if n != "hidden_dim" else (n, "cat", (list(range(64, 513, 64)),), {})
             for n, k, a, kw in _SPACE]

    def objective(trial):
        best = 0.0
        for epoch, metrics in enumerate(train_fn(_suggest(trial, space)), start=1):
            best = max(best, metrics["val_acc"])
            trial.report(metrics["val_acc"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    return objective


# --------------------------------------------------------------------------- make_study


def study_with_try_load(storage=None, study_name=None, seed=0, pruner=None):
    """Correct: load first, create on KeyError; a multivariate TPE; the pruner chosen by an if."""
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    chosen = optuna.pruners.NopPruner() if pruner is None else pruner
    if storage is not None and study_name is not None:
        try:
            return optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=chosen)
        except KeyError:
            pass
    return optuna.create_study(storage=storage, study_name=study_name, sampler=sampler, pruner=chosen,
                               directions=["maximize"])


def study_minimizing(storage=None, study_name=None, seed=0, pruner=None):
    """Wrong: create_study's default direction (minimize)."""
    return optuna.create_study(storage=storage, study_name=study_name, sampler=optuna.samplers.TPESampler(seed=seed),
                               pruner=pruner or optuna.pruners.NopPruner(), load_if_exists=True)


def study_unseeded(storage=None, study_name=None, seed=0, pruner=None):
    """Wrong: the seed is not given to the sampler."""
    return optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                               pruner=pruner or optuna.pruners.NopPruner(), load_if_exists=True)


def study_not_resumable(storage=None, study_name=None, seed=0, pruner=None):
    """Wrong: without load_if_exists the second call fails on an existing study."""
    return optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                               sampler=optuna.samplers.TPESampler(seed=seed),
                               pruner=pruner or optuna.pruners.NopPruner())


def study_default_pruner(storage=None, study_name=None, seed=0, pruner=None):
    """Wrong: pruner=None passed through, so Optuna's default MedianPruner prunes."""
    return optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                               sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner, load_if_exists=True)


def study_random_sampler(storage=None, study_name=None, seed=0, pruner=None):
    """Wrong: a random sampler, not TPE."""
    return optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                               sampler=optuna.samplers.RandomSampler(seed=seed),
                               pruner=pruner or optuna.pruners.NopPruner(), load_if_exists=True)


def study_ignores_storage(storage=None, study_name=None, seed=0, pruner=None):
    """Wrong: always in memory, so nothing survives."""
    return optuna.create_study(study_name=study_name, direction="maximize",
                               sampler=optuna.samplers.TPESampler(seed=seed),
                               pruner=pruner or optuna.pruners.NopPruner())


# --------------------------------------------------------------------------- best_so_far


def best_with_fmax(values, direction):
    """Correct: NumPy's fmax/fmin ignore NaN; None becomes NaN first."""
    a = np.array([np.nan if v is None else v for v in values], dtype=float)
    acc = np.fmax.accumulate if direction == "maximize" else np.fmin.accumulate
    return acc(a).tolist() if len(a) else []


def best_with_accumulate(values, direction):
    """Correct: itertools.accumulate with a function that keeps the better of two."""
    better = max if direction == "maximize" else min

    def step(best, v):
        if v is None or v != v:
            return best
        return v if best != best else better(best, v)

    return list(itertools.accumulate(values, step, initial=math.nan))[1:]


def best_always_max(values, direction):
    """Wrong: the direction ignored."""
    out, best = [], -math.inf
    for v in values:
        if v is not None and not math.isnan(v):
            best = max(best, v)
        out.append(best if best > -math.inf else math.nan)
    return out


def best_propagates_nan(values, direction):
    """Wrong: np.maximum.accumulate carries a NaN forward."""
    a = np.array([np.nan if v is None else v for v in values], dtype=float)
    return (np.maximum.accumulate(a) if direction == "maximize" else np.minimum.accumulate(a)).tolist()


def best_none_as_zero(values, direction):
    """Wrong: a failed trial counted as 0."""
    clean = [0.0 if (v is None or math.isnan(v)) else v for v in values]
    better = max if direction == "maximize" else min
    return list(itertools.accumulate(clean, better))


def best_drops_missing(values, direction):
    """Wrong: failed trials dropped, so the list is shorter than the trials."""
    clean = [v for v in values if v is not None and not math.isnan(v)]
    better = max if direction == "maximize" else min
    return list(itertools.accumulate(clean, better))


def best_sorts_in_place(values, direction):
    """Wrong: sorts the caller's list."""
    values.sort()
    return best_with_fmax(values, direction)


CORRECT = {
    "objective": [objective_from_a_table, objective_with_history, objective_reordered_choices],
    "make_study": [study_with_try_load],
    "best_so_far": [best_with_fmax, best_with_accumulate],
}

WRONG = {
    "objective": [
        (objective_returns_last, "最後のエポック"),
        (objective_forgets_return, "数値を返していない"),
        (objective_reports_loss, "検証の損失を報告"),
        (objective_reports_error, "誤り率"),
        (objective_linear_lr, "線形"),
        (objective_early_stopped_on_loss, "検証の損失が最小のエポック"),
        (objective_never_prunes, "枝刈りされずに"),
        (objective_breaks_instead, "枝刈りされずに"),
        (objective_trains_everything_first, "先に計算"),
        (objective_drops_batch_size, "batch_size が train_fn"),
        (objective_hidden_as_categories, "hidden_dim の提案が表と違います"),
    ],
    "make_study": [
        (study_minimizing, "最小化"),
        (study_unseeded, "同じ seed"),
        (study_not_resumable, "load_if_exists"),
        (study_default_pruner, "MedianPruner"),
        (study_random_sampler, "TPESampler"),
        (study_ignores_storage, "トライアルが 0 個"),
    ],
    "best_so_far": [
        (best_always_max, "minimize"),
        (best_propagates_nan, "NaN"),
        (best_none_as_zero, "NaN にします"),
        (best_drops_missing, "長さ"),
        (best_sorts_in_place, "書き換えて"),
    ],
}
