"""Measuring instruments every chapter shares: time, memory, activations, gradients, curves.

    from solutions.instruments import time_ms, peak_memory_mib, record_outputs, plot_curve

Each works on the CPU and on CUDA alike, so a chapter's cell measures the same thing on a
reader's laptop, in the tests and on a Colab GPU. Chapters import these; none re-implements
them.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

# =======================================================================================
# Time and memory


def synchronize(device) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously; the CPU does not)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device="cpu", repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls.

    On CUDA the device is synchronized before the clock starts and before it stops, so the
    time covers the kernels and not only their launch.
    """
    if repeats < 1:
        raise ValueError("repeats は 1 以上にしてください")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


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


def peak_memory_mib(fn: Callable[[], object], device="cpu") -> float:
    """Peak memory (MiB) that ``fn()`` allocates beyond what was already allocated.

    On CUDA: the caching allocator's peak. On the CPU: the running sum of the allocations and
    frees that the PyTorch profiler records, in time order (tensors only; Python objects and
    library workspaces outside PyTorch's allocator are not counted).
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


# =======================================================================================
# Activations and gradients


@contextlib.contextmanager
def record_outputs(modules: dict[str, nn.Module]):
    """Record each module's output (detached; a tuple stays a tuple) during the ``with`` body.

    The last call of a module wins. Hooks are removed on exit, also after an exception.
    """
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


def activation_stats(x: torch.Tensor) -> dict[str, float]:
    """Mean, standard deviation, RMS and largest absolute value of one activation tensor."""
    x = x.detach().float()
    return {"mean": x.mean().item(), "std": x.std().item(), "rms": x.pow(2).mean().sqrt().item(),
            "max_abs": x.abs().max().item()}


def gradient_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the gradient of every parameter tensor, keyed by its name."""
    return {name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None}


def module_gradient_norm(module: nn.Module) -> float:
    """L2 norm of the gradients of all of a module's parameters taken together."""
    return math.sqrt(sum(p.grad.norm().item() ** 2 for p in module.parameters() if p.grad is not None))


def block_gradient_norms(model) -> list[float]:
    """One gradient norm per block: of ``model.blocks``, or of a sequence of modules."""
    blocks = model.blocks if hasattr(model, "blocks") else model
    return [module_gradient_norm(block) for block in blocks]


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device="cpu",
                        batch_size: int = 512) -> dict[str, float]:
    """Mean cross-entropy and accuracy of a classifier on (x, y), in eval mode, in batches.

    The model's training/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    try:
        for i in range(0, len(x), batch_size):
            logits = model(x[i:i + batch_size].to(device))
            target = y[i:i + batch_size].to(device)
            loss += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(-1) == target).sum().item()
    finally:
        model.train(was_training)
    return {"loss": loss / len(x), "accuracy": correct / len(x)}


# =======================================================================================
# Several seeds and training curves


def mean_and_spread(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of results over seeds."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("値がありません")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_mean_spread(values: Iterable[float], fmt: str = ".3f", unit: str = "") -> str:
    """'0.912 ± 0.004 (n=3)': how the book reports a result over several seeds (spread: sample std)."""
    values = list(values)
    mean, spread = mean_and_spread(values)
    return f"{mean:{fmt}} ± {spread:{fmt}}{unit} (n={len(values)})"


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    y = np.asarray(values, dtype=float)
    if window <= 1 or y.size == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_curve(ax, x, ys, label=None, *, reference=None, reference_label=None, smoothing: int = 1,
               color=None, **line_kwargs):
    """Draw a training curve on ``ax``, with its spread over seeds and a reference.

    ``ys`` is one run (a sequence) or several seeds' runs of the same length (seeds × points):
    then the mean is drawn as a line and the band spans the lowest to the highest run.
    ``reference`` is a number (a dashed line: a baseline, a bound, a target return) or a pair
    ``(low, high)`` (a shaded band: an acceptable range). Returns the mean curve.
    """
    runs = np.atleast_2d(np.asarray(ys, dtype=float))
    x = np.asarray(x, dtype=float)
    if runs.shape[1] != x.size:
        raise ValueError(f"x の長さ {x.size} と曲線の長さ {runs.shape[1]} が違います")
    runs = np.stack([smooth(r, smoothing) for r in runs])
    mean = runs.mean(0)
    (line,) = ax.plot(x, mean, label=label, color=color, **line_kwargs)
    if runs.shape[0] > 1:
        ax.fill_between(x, runs.min(0), runs.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
    if reference is not None:
        if np.ndim(reference) == 0:
            ax.axhline(float(reference), color="gray", ls="--", lw=1, label=reference_label)
        else:
            low, high = reference
            ax.axhspan(float(low), float(high), color="gray", alpha=0.15, label=reference_label)
    return mean


# =======================================================================================
# Reinforcement learning


def evaluate_policy(act: Callable[[np.ndarray], np.ndarray], env_id: str, episodes: int, seed: int) -> float:
    """Mean return of ``act`` over ``episodes`` episodes seeded seed, seed + 1, ...

    The episodes run side by side, each in its own environment: ``act`` receives the observations of
    the episodes still running as one batch (n, obs_dim) and returns their n actions, so a policy
    network runs once per time step instead of once per step of every episode.
    """
    import gymnasium as gym

    envs = [gym.make(env_id) for _ in range(episodes)]
    obs = [env.reset(seed=seed + e)[0] for e, env in enumerate(envs)]
    returns = [0.0] * episodes
    running = list(range(episodes))
    while running:
        actions = act(np.stack([obs[e] for e in running]))
        still = []
        for e, action in zip(running, actions, strict=True):
            obs[e], reward, terminated, truncated, _ = envs[e].step(int(action))
            returns[e] += float(reward)
            if not (terminated or truncated):
                still.append(e)
        running = still
    for env in envs:
        env.close()
    return float(np.mean(returns))


# ---------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for the rest (never a pickle)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim.") -> tuple[dict, list]:
    """An optimizer's per-parameter state as flat named tensors (for safetensors) and its param groups
    (plain numbers, for JSON)."""
    state = optimizer.state_dict()
    tensors = {f"{prefix}{pid}.{name}": value for pid, per_param in state["state"].items()
               for name, value in per_param.items()}
    return tensors, state["param_groups"]


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, param_groups: list,
                         prefix: str = "optim.") -> None:
    """The inverse of :func:`optimizer_state_tensors`."""
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, name = key.removeprefix(prefix).split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


CHECKPOINT_FORMAT = 2       # raise when what a checkpoint holds changes: older ones are then not resumed


def write_checkpoint(directory, tensors: dict, info: dict) -> None:
    """``tensors`` to run.safetensors, ``info`` (numbers, lists, RNG states) to run.json."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, d / "run.safetensors")
    info = {**info, "format": CHECKPOINT_FORMAT}
    (d / "run.json").write_text(json.dumps(info, ensure_ascii=False), encoding="utf-8")


def read_checkpoint(directory) -> tuple[dict, dict]:
    """(tensors, info) as :func:`write_checkpoint` wrote them."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    d = Path(directory)
    return load_file(d / "run.safetensors"), json.loads((d / "run.json").read_text(encoding="utf-8"))


def saved_with_config(directory, config: dict) -> bool:
    """True when ``directory`` holds a run saved in this checkpoint format with exactly these settings."""
    import json
    from pathlib import Path

    path = Path(directory) / "run.json"
    if not path.exists():
        return False
    info = json.loads(path.read_text(encoding="utf-8"))
    return info.get("format") == CHECKPOINT_FORMAT and info["config"] == config


def env_state(env) -> tuple[np.ndarray, dict]:
    """What a classic-control environment needs to go on with its episode: its physical state (an array)
    and, for JSON, its random generator, the step count of its TimeLimit and CartPole's
    steps_beyond_terminated."""
    import gymnasium as gym

    limit = env
    while not isinstance(limit, gym.wrappers.TimeLimit):
        limit = limit.env
    inner = env.unwrapped
    return np.asarray(inner.state, dtype=np.float64), {
        "rng": inner.np_random.bit_generator.state, "elapsed_steps": limit._elapsed_steps,
        "steps_beyond_terminated": getattr(inner, "steps_beyond_terminated", None)}


def restore_env_state(env, state: np.ndarray, info: dict) -> None:
    """The inverse of :func:`env_state`, on an environment made with the same id."""
    import gymnasium as gym

    limit = env
    while not isinstance(limit, gym.wrappers.TimeLimit):
        limit = limit.env
    inner = env.unwrapped
    inner.state = np.array(state)
    inner.np_random.bit_generator.state = info["rng"]
    limit._elapsed_steps = info["elapsed_steps"]
    if hasattr(inner, "steps_beyond_terminated"):                   # CartPole only
        inner.steps_beyond_terminated = info["steps_beyond_terminated"]


# ---------------------------------------------------------------------------------------
# Stored reference runs: one long CSV, a row per evaluation of each (variant, seed) run

RUNS_FIELDS = ("variant", "seed", "step", "eval_return", "seconds")


def write_csv(path, rows: Iterable[dict], fields: Sequence[str]) -> None:
    """Write rows (dicts) to a CSV with these columns, in this order; None becomes an empty cell."""
    import csv
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in fields})


def read_csv(package_file: str, path=None, types: dict | None = None) -> list[dict]:
    """Rows of a stored CSV: ``path`` if given, else the file shipped inside the solutions package.

    ``types`` maps a column to the function that converts its text (int, float, ...); an empty
    cell becomes None; columns not named stay text.
    """
    import csv
    from importlib import resources
    from pathlib import Path

    types = types or {}
    source = Path(path) if path else resources.files("solutions").joinpath(package_file)
    rows = csv.DictReader(source.read_text(encoding="utf-8").splitlines())
    return [{k: (None if v == "" else types.get(k, str)(v)) for k, v in r.items()} for r in rows]


def write_runs_csv(path, runs: Iterable[list[dict]]) -> None:
    """Write the rows of every run (each a list of dicts with RUNS_FIELDS) to one CSV."""
    write_csv(path, (row for rows in runs for row in rows), RUNS_FIELDS)


def read_runs_csv(package_file: str, path=None) -> list[dict]:
    """The stored runs: ``path`` if given, else the file shipped inside the solutions package."""
    return read_csv(package_file, path, {"seed": int, "step": int, "eval_return": float, "seconds": float})


def reference_curves(rows: list[dict], variant: str) -> tuple[np.ndarray, np.ndarray]:
    """One variant's stored runs: the evaluation steps (points,) and the returns (seeds, points)."""
    mine = [r for r in rows if r["variant"] == variant]
    if not mine:
        raise ValueError(f"参照の記録に {variant!r} がありません（あるもの: {sorted({r['variant'] for r in rows})}）")
    seeds = sorted({r["seed"] for r in mine})
    steps = sorted({r["step"] for r in mine})
    table = {(r["seed"], r["step"]): r["eval_return"] for r in mine}
    return np.array(steps), np.array([[table[s, t] for t in steps] for s in seeds])
