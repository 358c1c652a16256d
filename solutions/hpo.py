"""Chapter 9: hyperparameter optimization with Optuna, from one notebook to many workers.

The task: a small MLP on scikit-learn's digits, trained for a fixed number of epochs; the
objective maximises the validation accuracy. Everything here imports Optuna inside the
functions that use it, so that importing ``solutions`` (the checker does, in every chapter)
never needs Optuna.

The module is also the command line the chapter runs in other processes::

    python -m solutions.hpo worker --storage URL --study NAME --n-trials 25 --seed 1
    python -m solutions.hpo reference --out solutions/data      # the stored comparison (~12 min on 2 cores)
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .instruments import read_csv, write_csv

# =======================================================================================
# The task: digits, an MLP, a fixed epoch budget


def digits_splits(n_train: int = 500, n_val: int = 400, seed: int = 0):
    """((x, y) train, (x, y) validation, (x, y) test) from scikit-learn's 1,797 digits.

    x: (N, 64) float32 in [0, 1]; y: (N,) int64. The test split is everything left over and is
    used once, for the best configuration at the end.
    """
    x, y = _digits_arrays()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    x = torch.tensor(x, dtype=torch.float32)[order] / 16.0
    y = torch.tensor(y, dtype=torch.int64)[order]
    a, b = n_train, n_train + n_val
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def _digits_arrays():
    """scikit-learn's digits as load_digits(return_X_y=True) gives them, read from the CSV file that ships
    in scikit-learn without importing it: importing it is about 2 s of every worker process's start
    (sections 9 and 10 start a dozen). Its own loader where the file is not where scikit-learn keeps it."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")       # finds the package without running it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")   # 64 pixels (0-16), then the label
            return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


class MLP(nn.Module):
    """64 → hidden → … → hidden → 10: num_layers hidden layers, each Linear → ReLU → Dropout."""

    def __init__(self, hidden: int, num_layers: int, dropout: float, n_in: int = 64, n_out: int = 10):
        super().__init__()
        layers, width = [], n_in
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, n_out))

    def forward(self, x):           # (B, 64) → (B, 10)
        return self.net(x)


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (expected 'adam', 'sgd' or 'adamw')")


@torch.no_grad()
def _evaluate(model, x, y) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(-1) == y).float().mean().item()
    model.train()
    return loss, acc


def train_mlp(config: dict, data, epochs: int, seed: int = 0, device="cpu") -> Iterator[dict]:
    """Train an MLP with ``config`` and yield after every epoch.

    config: learning_rate, batch_size, optimizer, weight_decay, dropout, hidden_dim, num_layers
    (the chapter's search space).
    Yields {"epoch": 1.., "val_loss": float, "val_acc": float}. A generator: the caller can stop
    training after any epoch simply by not asking for more (this is how a pruned trial stops).
    The same config and seed give the same numbers.
    """
    for _, metrics in _training(config, data, epochs, seed, device):
        yield metrics


def _training(config: dict, data, epochs: int, seed: int, device) -> Iterator[tuple[nn.Module, dict]]:
    """(model, metrics) after every epoch; the test split is never touched here."""
    (x_tr, y_tr), (x_va, y_va) = (tuple(t.to(device) for t in split) for split in data[:2])
    torch.manual_seed(seed)
    model = MLP(int(config["hidden_dim"]), int(config["num_layers"]), float(config["dropout"])).to(device)
    opt = make_optimizer(config["optimizer"], model.parameters(), float(config["learning_rate"]),
                         float(config["weight_decay"]))
    g = torch.Generator().manual_seed(seed)
    batch_size = int(config["batch_size"])
    n = len(y_tr)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=g).to(device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val_loss, val_acc = _evaluate(model, x_va, y_va)
        yield model, {"epoch": epoch, "val_loss": val_loss, "val_acc": val_acc}


def evaluate_on_test(config: dict, data, epochs: int, seed: int = 0, device="cpu") -> dict:
    """Train config again, keep the weights of the epoch with the best validation accuracy, and
    evaluate those weights on the test split once.

    The same seed gives the same run as in the study, so val_acc equals the trial's value.
    Returns the metrics of that epoch with "test_acc" added.
    """
    import copy

    best, state = None, None
    for model, m in _training(config, data, epochs, seed, device):
        if best is None or m["val_acc"] > best["val_acc"]:
            best, state = m, copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    x_te, y_te = (t.to(device) for t in data[2])
    return {**best, "test_acc": _evaluate(model, x_te, y_te)[1]}


def make_train_fn(data, epochs: int, seed: int = 0, device="cpu") -> Callable[[dict], Iterator[dict]]:
    """``train_fn(config)`` for the objective: the data, epochs and seed fixed once."""

    def train_fn(config: dict) -> Iterator[dict]:
        return train_mlp(config, data, epochs, seed=seed, device=device)

    return train_fn


# =======================================================================================
# Exercise "objective": the search space, report, prune, return the best epoch

# The search space the chapter fixes (name: (kind, low/choices, high, log)).
# The seed listing's space, kept: now every value reaches the model, the optimizer or the loader.
SEARCH_SPACE = {
    "learning_rate": ("float", 1e-5, 1e-1, {"log": True}),
    "batch_size": ("categorical", (16, 32, 64, 128)),
    "optimizer": ("categorical", ("adam", "sgd", "adamw")),
    "weight_decay": ("float", 1e-6, 1e-2, {"log": True}),
    "dropout": ("float", 0.1, 0.5, {}),
    "hidden_dim": ("int", 64, 512, {"step": 64}),
    "num_layers": ("int", 2, 8, {}),
}


def make_objective(train_fn):
    """objective(trial) -> the best validation accuracy over the epochs of train_fn(config).

    Every epoch's validation accuracy is reported (step = epoch, from 1) so that a pruner
    compares trials on the metric that is returned, in the study's direction (maximise).
    """
    import optuna

    def objective(trial):
        config = {
            "learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-1, log=True),
            "batch_size": trial.suggest_categorical("batch_size", [16, 32, 64, 128]),
            "optimizer": trial.suggest_categorical("optimizer", ["adam", "sgd", "adamw"]),
            "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
            "dropout": trial.suggest_float("dropout", 0.1, 0.5),
            "hidden_dim": trial.suggest_int("hidden_dim", 64, 512, step=64),
            "num_layers": trial.suggest_int("num_layers", 2, 8),
        }
        best = -math.inf
        for step, metrics in enumerate(train_fn(config), start=1):
            acc = metrics["val_acc"]
            best = max(best, acc)
            trial.report(acc, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    return objective


def search_space_distributions() -> dict:
    """SEARCH_SPACE as Optuna distributions (what trial.distributions should hold)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for name, spec in SEARCH_SPACE.items():
        if spec[0] == "categorical":
            out[name] = CategoricalDistribution(list(spec[1]))
        elif spec[0] == "float":
            out[name] = FloatDistribution(spec[1], spec[2], **spec[3])
        else:
            out[name] = IntDistribution(spec[1], spec[2], **spec[3])
    return out


# =======================================================================================
# Exercise "make_study": a maximising, seeded, resumable study


def make_study(storage=None, study_name=None, seed=0, pruner=None):
    """Create the study, or load it when one of that name already is in ``storage``.

    storage: None (in memory), a URL (``sqlite:///file.db``, ``postgresql+psycopg2://...``) or a
    storage object. pruner: None means no pruning (Optuna's own default would be MedianPruner).
    """
    import optuna

    return optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=pruner if pruner is not None else optuna.pruners.NopPruner(),
        load_if_exists=True,
    )


# =======================================================================================
# Exercise "best_so_far"


def best_so_far(values, direction):
    """The best value among values[: i + 1] for every i, for plotting a search's progress.

    direction: "maximize" or "minimize" (or an optuna StudyDirection). None and NaN (failed
    or pruned trials) are skipped; before the first real value the entry is NaN.
    """
    name = getattr(direction, "name", direction)
    maximize = str(name).lower() in ("maximize", "maximise", "max")
    if str(name).lower() not in ("maximize", "maximise", "max", "minimize", "minimise", "min"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    out, best = [], math.nan
    for v in values:
        x = math.nan if v is None else float(v)
        if not math.isnan(x) and (math.isnan(best) or (x > best if maximize else x < best)):
            best = x
        out.append(best)
    return out


# =======================================================================================
# TPE, shown: the split of the observations at gamma


def tpe_split(values: Sequence[float], gamma: float = 0.1, direction: str = "maximize"):
    """Indices of the "good" trials (the best ceil(gamma · n)) and of the rest, as TPE splits them.

    Optuna's default gamma is min(ceil(0.1 · n), 25) good trials; this is the plain rule
    with a fraction, to draw l(x) (density of the good) and g(x) (of the rest).
    """
    n = len(values)
    n_good = max(1, math.ceil(gamma * n))
    order = sorted(range(n), key=lambda i: values[i], reverse=(direction == "maximize"))
    return sorted(order[:n_good]), sorted(order[n_good:])


# =======================================================================================
# Optuna's matplotlib figures with Japanese labels

OPTUNA_LABELS = {
    "Objective Value": "検証の正解率",
    "Best Value": "そこまでの最良値",
    "Trial": "トライアルの番号",
    "Hyperparameter Importance": "重要度",
    "Hyperparameter": "ハイパーパラメータ",
    "Step": "エポック",
    "Intermediate Value": "検証の正解率（途中経過）",
}


def relabel(ax, title: str, labels: dict | None = None):
    """Replace the English title, axis labels, tick labels and legend entries of an Optuna figure.

    Optuna puts some titles on the left and others in the centre, and draws the colour bar on an
    axes of its own: every axes of the figure is relabelled. Returns ax.
    """
    labels = {**OPTUNA_LABELS, **(labels or {})}
    for loc in ("left", "center", "right"):
        ax.set_title("", loc=loc)
    ax.set_title(title)
    for a in ax.figure.axes:
        for get, put in ((a.get_xlabel, a.set_xlabel), (a.get_ylabel, a.set_ylabel)):
            if get() in labels:
                put(labels[get()])
        ticks = [t.get_text() for t in a.get_xticklabels()]
        if any(t in labels for t in ticks):
            a.set_xticks(a.get_xticks())
            a.set_xticklabels([labels.get(t, t) for t in ticks])
        legend = a.get_legend()
        if legend is not None:
            for text in legend.get_texts():
                text.set_text(labels.get(text.get_text(), text.get_text()))
    return ax


# =======================================================================================
# Samplers and pruners compared


def make_sampler(name: str, seed: int):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe_independent":                 # one density per hyperparameter (Optuna 4's default)
        return optuna.samplers.TPESampler(seed=seed, multivariate=False)
    if name == "gp":                              # Gaussian-process Bayesian optimization (needs scipy)
        return optuna.samplers.GPSampler(seed=seed)
    if name == "cmaes":                           # needs the cmaes package; categorical values are sampled at random
        return optuna.samplers.CmaEsSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r} (tpe, random, tpe_independent, gp, cmaes)")


def make_pruner(name: str, epochs: int):
    import optuna

    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    raise ValueError(f"unknown pruner {name!r}")


def run_search(sampler: str, pruner: str, seed: int, n_trials: int, data, epochs: int) -> list[dict]:
    """One study in memory; one row per trial (state, value, epochs trained, best so far).

    seed is the sampler's; the training inside the objective always uses seed 0, so the same
    configuration gives the same value in every search.
    """
    import optuna

    # A fixed name: HyperbandPruner assigns trials to brackets by a hash of the study name and
    # the trial number, and an unnamed study gets a random name.
    study = optuna.create_study(study_name=f"{sampler}-{pruner}-seed{seed}", direction="maximize",
                                sampler=make_sampler(sampler, seed), pruner=make_pruner(pruner, epochs))
    objective = make_objective(make_train_fn(data, epochs))
    start = time.perf_counter()
    study.optimize(objective, n_trials=n_trials)
    seconds = time.perf_counter() - start
    done = optuna.trial.TrialState.COMPLETE
    values = [t.value if t.state == done else None for t in study.trials]
    return [{"sampler": sampler, "pruner": pruner, "seed": seed, "trial": t.number, "state": t.state.name,
             "value": value, "epochs": len(t.intermediate_values), "best": best, "seconds": seconds}
            for t, value, best in zip(study.trials, values, best_so_far(values, "maximize"), strict=True)]


def parzen(points: Sequence[float], grid, bandwidth: float):
    """A Parzen (kernel density) estimate on grid: the mean of Gaussians centred on the points."""
    import numpy as np

    points = np.asarray(points, dtype=float)[:, None]
    z = (np.asarray(grid, dtype=float)[None, :] - points) / bandwidth
    return np.exp(-0.5 * z**2).mean(0) / (bandwidth * math.sqrt(2 * math.pi))


def first_reaching(rows: list[dict], target: float) -> int | None:
    """The 1-based trial count at which the best so far first reaches target (None: never)."""
    for r in rows:
        if r["best"] is not None and not math.isnan(r["best"]) and r["best"] >= target:
            return r["trial"] + 1
    return None


# =======================================================================================
# Stored reference runs (read back by the chapter)

REFERENCE = {
    "n_train": 500, "n_val": 400, "epochs": 15, "n_trials": 40,
    "seeds": tuple(range(10)),
    "searches": (("tpe", "none"), ("random", "none"), ("tpe", "median"), ("tpe", "hyperband")),
}
RUN_FIELDS = ("sampler", "pruner", "seed", "trial", "state", "value", "epochs", "best", "seconds")


RUN_TYPES = {"seed": int, "trial": int, "value": float, "epochs": int, "best": float, "seconds": float}


def write_runs(path, rows: list[dict]) -> None:
    write_csv(path, rows, RUN_FIELDS)


def read_runs(path=None) -> list[dict]:
    """The stored reference runs (solutions/data/hpo_runs.csv unless path is given).

    value is None for a trial that did not complete; best is NaN before the first completed trial.
    """
    rows = read_csv("data/hpo_runs.csv", path, RUN_TYPES)
    for r in rows:
        r["best"] = math.nan if r["best"] is None else r["best"]
    return rows


def select(rows: list[dict], **where) -> list[list[dict]]:
    """The rows matching ``where``, grouped into one list per seed (seed order)."""
    keep = [r for r in rows if all(r[k] == v for k, v in where.items())]
    seeds = sorted({r["seed"] for r in keep})
    return [[r for r in keep if r["seed"] == s] for s in seeds]


# =======================================================================================
# Several processes, one study: the worker command, PostgreSQL, heartbeats


def storage_for(url: str, heartbeat: bool = False, grace: int = 4):
    """The storage a worker opens: a URL as is, or an RDBStorage with heartbeats and retries.

    With heartbeat=True a running trial writes a heartbeat every second; a trial whose last
    heartbeat is older than ``grace`` seconds is marked FAIL by the next worker that starts a trial, and
    RetryHeartbeatStaleTrialCallback queues a copy of it (same parameters) that a live worker
    runs. (RetryFailedTrialCallback and failed_trial_callback are the deprecated names.)
    """
    if not heartbeat:
        return url
    import warnings

    import optuna

    with warnings.catch_warnings():            # the callback is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
    return optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=grace,
                                      heartbeat_stale_trial_callback=retry)


def run_worker(storage: str, study_name: str, n_trials: int, seed: int | None, epochs: int = 15,
               n_train: int = 500, n_val: int = 400, heartbeat: bool = False, grace: int = 4) -> int:
    """What one worker process does: open (or create) the study and run n_trials of it."""
    import optuna

    torch.set_num_threads(1)                      # several workers share the cores
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = digits_splits(n_train, n_val)
    study = make_study(storage_for(storage, heartbeat, grace), study_name, seed=seed)
    objective = make_objective(make_train_fn(data, epochs))

    def tagged(trial):                            # which process ran the trial (read back in the chapter)
        trial.set_user_attr("worker_pid", os.getpid())
        return objective(trial)

    study.optimize(tagged, n_trials=n_trials)
    return 0


def worker_command(storage: str, study_name: str, n_trials: int, seed: int | None, epochs: int,
                   heartbeat: bool = False, grace: int = 4) -> list[str]:
    cmd = [sys.executable, "-m", "solutions.hpo", "worker", "--storage", storage, "--study", study_name,
           "--n-trials", str(n_trials), "--epochs", str(epochs)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    if heartbeat:
        cmd += ["--heartbeat", "--grace", str(grace)]
    return cmd


def start_workers(storage: str, study_name: str, n_workers: int, trials_per_worker: int, epochs: int,
                  heartbeat: bool = False, seed: int = 0, grace: int = 4) -> list[subprocess.Popen]:
    """Start n_workers processes on one study; worker i samples with seed seed + i."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return [subprocess.Popen(worker_command(storage, study_name, trials_per_worker, seed + i, epochs, heartbeat, grace),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(n_workers)]


def wait_workers(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    codes = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        if p.returncode not in (0, -signal.SIGKILL):
            raise RuntimeError(f"worker exited with {p.returncode}:\n{out}")
        codes.append(p.returncode)
    return codes


@dataclass
class ParallelRun:
    workers: int
    trials: int             # trials in the study after the run
    complete: int
    unique_numbers: bool
    wall_seconds: float     # from starting the processes to the last one exiting
    busy_seconds: float     # from the first trial's start to the last trial's end
    trials_per_minute: float


def parallel_run(storage: str, study_name: str, n_workers: int, n_trials: int, epochs: int,
                 configs: Sequence[dict] = ()) -> ParallelRun:
    """n_trials split over n_workers processes on one study; what the storage holds afterwards.

    configs: parameters queued in the study first (study.enqueue_trial), which the workers run
    before sampling new ones; with the same configs, runs with different worker counts do the
    same work, so their throughput can be compared.
    """
    import optuna

    if n_trials % n_workers:
        raise ValueError("n_trials must be a multiple of n_workers")
    if configs:
        study = make_study(storage, study_name)
        for params in configs:
            study.enqueue_trial(dict(params))
    start = time.perf_counter()
    wait_workers(start_workers(storage, study_name, n_workers, n_trials // n_workers, epochs))
    wall = time.perf_counter() - start
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    busy = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return ParallelRun(n_workers, len(trials), len(done), len({t.number for t in trials}) == len(trials),
                       wall, busy, 60 * len(done) / busy)


@dataclass
class KillDemo:
    killed_trial: int               # the trial that was running in the killed process
    states: dict                    # trial number → state name, after the replacement worker
    retries: list                   # numbers of trials that re-ran the killed trial (system attr failed_trial)
    same_params: bool               # the retry ran with the killed trial's parameters
    retry_value: float | None
    by_replacement: bool            # the retry ran in the replacement worker (else in the surviving one)


def kill_demo(storage: str, study_name: str, epochs: int = 40, trials_per_worker: int = 4,
              grace: int = 4) -> KillDemo:
    """Two heartbeat workers; SIGKILL one in the middle of a trial; then, if needed, a replacement worker.

    The killed trial stays RUNNING (nobody ends it) until a worker that starts a trial finds its
    heartbeat older than the grace period, marks it FAIL and, through
    RetryHeartbeatStaleTrialCallback, queues a copy that the same worker runs next. When the other
    worker has finished before that, a replacement worker is started after the grace period, as
    a scheduler would restart a lost job.
    """
    import optuna

    state = optuna.trial.TrialState
    procs = start_workers(storage, study_name, 2, trials_per_worker, epochs, heartbeat=True, grace=grace)
    victim = procs[0]
    reader = optuna.storages.RDBStorage(storage)
    study = None
    killed = None
    deadline = time.monotonic() + 300
    while killed is None:
        if time.monotonic() > deadline or victim.poll() is not None:
            for p in procs:
                p.kill()
            raise RuntimeError("the worker to kill never ran a trial")
        if study is None:
            try:
                study = optuna.load_study(study_name=study_name, storage=reader)
            except KeyError:              # the workers have not created the study yet
                time.sleep(0.05)
                continue
        running = study.get_trials(deepcopy=False, states=(state.RUNNING,))
        mine = [t for t in running                 # training: every parameter already suggested
                if t.user_attrs.get("worker_pid") == victim.pid and len(t.params) == len(SEARCH_SPACE)]
        if mine:
            victim.send_signal(signal.SIGKILL)
            killed = mine[0].number
        else:
            time.sleep(0.02)
    killed_at = time.monotonic()
    wait_workers(procs)

    def retried():
        return any(t.system_attrs.get("failed_trial") == killed and t.state == state.COMPLETE
                   for t in study.get_trials(deepcopy=False))

    replacement = []
    if not retried():
        time.sleep(max(0.0, killed_at + grace + 1.0 - time.monotonic()))
        replacement = start_workers(storage, study_name, 1, 1, epochs, heartbeat=True, seed=100, grace=grace)
        wait_workers(replacement)
    trials = study.get_trials(deepcopy=False)
    failed = trials[killed]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    done = [t for t in retries if t.state == state.COMPLETE]
    reader.engine.dispose()
    by = done[0].user_attrs.get("worker_pid") if done else None
    return KillDemo(killed, {t.number: t.state.name for t in trials}, [t.number for t in retries],
                    bool(done) and all(t.params == failed.params for t in retries),
                    done[0].value if done else None,
                    bool(replacement) and by == replacement[0].pid)


def start_postgres(directory):
    """A PostgreSQL server from the pgserver wheel, and the URL Optuna (SQLAlchemy) uses.

    The URL names the psycopg2 driver explicitly: SQLAlchemy 2.1 maps a plain postgresql://
    to psycopg 3. Stop the server with server.cleanup() (or let the process end).
    """
    import pgserver

    server = pgserver.get_server(str(directory), cleanup_mode="stop")
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg2://", 1)
    return server, url


# =======================================================================================
# The command line


def _reference(out: Path, jobs: int, only: Sequence[str] = ()) -> None:
    """Run the stored comparison (every search of REFERENCE, or only the pruners named) into out/hpo_runs.csv."""
    from concurrent.futures import ProcessPoolExecutor

    cfg = REFERENCE
    tasks = [(s, p, seed) for s, p in cfg["searches"] for seed in cfg["seeds"] if not only or p in only]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(_reference_task, tasks))
    rows = [r for rows in results for r in rows]
    path = out / "hpo_runs.csv"
    if only and path.exists():          # keep the stored rows of the other searches, in REFERENCE order
        kept = [r for r in read_runs(path) if r["pruner"] not in only]
        order = {key: i for i, key in enumerate(cfg["searches"])}
        rows = sorted(kept + rows, key=lambda r: (order[(r["sampler"], r["pruner"])], r["seed"], r["trial"]))
    write_runs(path, rows)


def _reference_task(task) -> list[dict]:
    import optuna

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler, pruner, seed = task
    cfg = REFERENCE
    rows = run_search(sampler, pruner, seed, cfg["n_trials"], digits_splits(cfg["n_train"], cfg["n_val"]),
                      cfg["epochs"])
    print(f"{sampler}/{pruner} seed {seed}: best {rows[-1]['best']:.4f} in {rows[-1]['seconds']:.1f} s",
          flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m solutions.hpo")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run trials of one shared study (any storage URL)")
    w.add_argument("--storage", required=True)
    w.add_argument("--study", required=True)
    w.add_argument("--n-trials", type=int, required=True)
    w.add_argument("--seed", type=int, default=None)
    w.add_argument("--epochs", type=int, default=15)
    w.add_argument("--heartbeat", action="store_true", help="RDB storage only: heartbeats and retries")
    w.add_argument("--grace", type=int, default=4, help="seconds without a heartbeat before a trial is failed")
    r = sub.add_parser("reference", help="write the stored sampler and pruner comparison")
    r.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--only", nargs="*", default=(), help="rerun only these pruners (none, median, hyperband)")
    args = parser.parse_args(argv)
    if args.command == "worker":
        return run_worker(args.storage, args.study, args.n_trials, args.seed, args.epochs, heartbeat=args.heartbeat,
                          grace=args.grace)
    _reference(args.out, args.jobs, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
