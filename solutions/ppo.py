"""Chapter 7: PPO with GAE on gymnasium vector environments.

The reference answers (GAE, the clipped surrogate loss, the clipped value loss) and the agent: an actor-critic with
orthogonal initialisation and a categorical policy on logits, rollouts from vector environments in
the SAME_STEP autoreset mode (the final observation of an episode arrives with the step that ended
it, so no fake transition is stored), truncation bootstrapped from that final observation's value,
termination not.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical

from .instruments import (
    env_state,
    evaluate_policy,
    load_optimizer_state,
    optimizer_state_tensors,
    read_checkpoint,
    read_runs_csv,
    restore_env_state,
    saved_with_config,
    write_checkpoint,
    write_runs_csv,
)
from .instruments import reference_curves as reference_curves  # re-exported for the chapter

# =======================================================================================
# Generalized advantage estimation


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
                gamma: float = 0.99, gae_lambda: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (T, N) from rewards, values, dones (T, N) and the value after the last step (N,).

    ``dones[t]`` is True when the episode ended at step t, so nothing is bootstrapped from t + 1:
    δ_t = r_t + γ V(s_{t+1}) (1 − d_t) − V(s_t),  A_t = δ_t + γ λ (1 − d_t) A_{t+1}.
    """
    not_done = 1.0 - dones.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(last_value, dtype=values.dtype)
    for t in reversed(range(rewards.shape[0])):
        next_value = last_value if t == rewards.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * next_value * not_done[t] - values[t]
        running = delta + gamma * gae_lambda * not_done[t] * running
        advantages[t] = running
    return advantages, advantages + values


def monte_carlo_returns(rewards: torch.Tensor, dones: torch.Tensor, gamma: float) -> torch.Tensor:
    """The seed listing's targets: discounted returns restarted at every episode end and started from 0
    at the end of the rollout (nothing bootstrapped, so an unfinished episode counts as finished)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        running = rewards[t] + gamma * running * (~dones[t]).to(rewards.dtype)
        out[t] = running
    return out


# =======================================================================================
# The clipped surrogate objective


def ppo_clip_loss(new_logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor,
                  clip_coef: float = 0.2) -> torch.Tensor:
    """−E[min(ρ A, clip(ρ, 1 − ε, 1 + ε) A)] with ρ = π_new / π_old, a scalar to minimise."""
    ratio = (new_logprob - old_logprob).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages
    return -torch.min(unclipped, clipped).mean()


def clipped_value_loss(new_value: torch.Tensor, old_value: torch.Tensor, returns: torch.Tensor,
                       clip_coef: float = 0.2) -> torch.Tensor:
    """½ E[max((V − R)², (V_clip − R)²)] with V_clip = V_old + clip(V − V_old, −ε, ε): the value may not
    gain from moving further than ε from the value it had when the rollout was collected."""
    clipped = old_value + (new_value - old_value).clamp(-clip_coef, clip_coef)
    return 0.5 * torch.max((new_value - returns) ** 2, (clipped - returns) ** 2).mean()


# =======================================================================================
# Actor-critic


def layer_init(layer: nn.Linear, gain: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, bias)
    return layer


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs (tanh), orthogonal init: gain √2 inside, 0.01 for the policy's
    logits (a nearly uniform first policy), 1 for the value."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 64):
        super().__init__()
        self.critic = nn.Sequential(layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh(),
                                    layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
                                    layer_init(nn.Linear(hidden, 1), gain=1.0))
        self.actor = nn.Sequential(layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh(),
                                   layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
                                   layer_init(nn.Linear(hidden, n_actions), gain=0.01))

    def value(self, obs):
        return self.critic(obs).squeeze(-1)

    def action_and_value(self, obs, action=None):
        dist = Categorical(logits=self.actor(obs))
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.value(obs)


# =======================================================================================
# Settings


@dataclass
class Config:
    env_id: str = "CartPole-v1"
    total_steps: int = 150_000       # environment steps summed over all environments
    num_envs: int = 8
    num_steps: int = 128             # rollout length per environment: a batch is num_envs × num_steps
    lr: float = 2.5e-3
    anneal_lr: bool = True           # lr falls linearly to 0 over total_steps
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    norm_adv: bool = True            # normalise the advantages within each minibatch
    clip: bool = True                # False: the plain surrogate ρA (no clipping)
    clip_coef: float = 0.2
    clip_vloss: bool = False         # True: the clipped value loss (clipped_value_loss)
    target_kl: float | None = None   # stop the update's epochs once the approximate KL exceeds this
    advantage: str = "gae"           # "gae" or "mc_normalized" (the seed listing's normalised Monte-Carlo returns)
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 64
    eval_every: int = 5_120
    eval_episodes: int = 20
    target_return: float = 475.0
    seed: int = 0

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_steps // self.batch_size


def evaluate(agent: ActorCritic, env_id: str, episodes: int, seed: int) -> float:
    """Greedy mean return: the most likely action of the policy."""

    @torch.no_grad()
    def act(obs):                                      # a batch of observations -> their actions
        return agent.actor(torch.as_tensor(obs, dtype=torch.float32)).argmax(-1).numpy()

    return evaluate_policy(act, env_id, episodes, seed)


def make_envs(env_id: str, num_envs: int):
    """Synchronous vector environments in SAME_STEP autoreset: the step that ends an episode returns the
    next episode's first observation, and the last observation of the ended one in info["final_obs"]."""
    import gymnasium as gym

    return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})


# =======================================================================================
# Training: collect a rollout, compute the advantages, learn from it for a few epochs


UPDATE_STATS = ("step", "lr", "policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac",
                "explained_variance", "epochs")


class Run:
    """One PPO run that can stop and go on. Every piece of state lives here (the networks, Adam, the
    environments and their random generators, the run's own torch random state, the counters and the
    history); ``save``/``load`` write it as safetensors plus JSON, never a pickle."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.envs = make_envs(cfg.env_id, cfg.num_envs)
        obs, _ = self.envs.reset(seed=cfg.seed)
        self.obs = torch.as_tensor(obs, dtype=torch.float32)
        obs_dim = self.envs.single_observation_space.shape[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.agent = ActorCritic(obs_dim, self.envs.single_action_space.n, cfg.hidden)
            self.torch_rng = torch.get_rng_state()      # the run draws actions and minibatches from its own stream
        self.optimizer = torch.optim.Adam(self.agent.parameters(), lr=cfg.lr, eps=1e-5, foreach=True)
        self.update, self.step, self.seconds = 0, 0, 0.0
        self.episode_return = np.zeros(cfg.num_envs)
        self.history = {"eval_step": [], "eval_return": [], "steps_to_target": None,
                        "episode_end": [], "episode_return": [], **{f"update_{k}": [] for k in UPDATE_STATS}}

    # ---- one rollout ------------------------------------------------------------------

    @torch.no_grad()
    def collect(self) -> dict[str, torch.Tensor]:
        """num_steps steps of every environment with the current policy. ``dones[t]`` marks the last
        step of an episode, whether it terminated or was truncated; on truncation the value of the final
        observation is added to the reward (γ·V(s_T)), so that cutting the trace there loses nothing."""
        cfg, agent = self.cfg, self.agent
        T, N = cfg.num_steps, cfg.num_envs
        buf = {"obs": torch.zeros(T, N, self.obs.shape[1]), "actions": torch.zeros(T, N, dtype=torch.long),
               "dones": torch.zeros(T, N, dtype=torch.bool),
               **{k: torch.zeros(T, N) for k in ("logprobs", "values", "rewards")}}
        for t in range(T):
            action, logprob, _, value = agent.action_and_value(self.obs)
            next_obs, reward, terminated, truncated, info = self.envs.step(action.numpy())
            self.episode_return += reward
            reward = torch.as_tensor(reward, dtype=torch.float32)
            cut = truncated & ~terminated
            if cut.any() and cfg.advantage == "gae":      # bootstrap from the final observation, not the reset one
                final = torch.as_tensor(np.stack([info["final_obs"][i] for i in np.flatnonzero(cut)]),
                                        dtype=torch.float32)
                reward[torch.from_numpy(cut)] += cfg.gamma * agent.value(final)
            done = terminated | truncated
            for i in np.flatnonzero(done):
                self.history["episode_end"].append(self.step + (t + 1) * N)
                self.history["episode_return"].append(float(self.episode_return[i]))
                self.episode_return[i] = 0.0
            buf["obs"][t], buf["actions"][t], buf["logprobs"][t], buf["values"][t] = self.obs, action, logprob, value
            buf["rewards"][t], buf["dones"][t] = reward, torch.from_numpy(done)
            self.obs = torch.as_tensor(next_obs, dtype=torch.float32)
        if cfg.advantage == "gae":
            buf["advantages"], buf["returns"] = compute_gae(buf["rewards"], buf["values"], buf["dones"],
                                                            agent.value(self.obs), cfg.gamma, cfg.gae_lambda)
        elif cfg.advantage == "mc_normalized":            # the seed listing: normalised Monte-Carlo returns
            returns = monte_carlo_returns(buf["rewards"], buf["dones"], cfg.gamma)
            buf["returns"] = (returns - returns.mean()) / (returns.std() + 1e-5)
            buf["advantages"] = buf["returns"] - buf["values"]
        else:
            raise ValueError(f"advantage は 'gae' か 'mc_normalized' です（{cfg.advantage!r}）")
        return buf

    # ---- learning from it -------------------------------------------------------------

    def learn(self, buf: dict[str, torch.Tensor]) -> dict[str, float]:
        """update_epochs passes over the rollout in shuffled minibatches; returns the update's statistics."""
        cfg, agent = self.cfg, self.agent
        flat = {k: v.reshape(cfg.batch_size, *v.shape[2:]) for k, v in buf.items()}
        minibatch = cfg.batch_size // cfg.num_minibatches
        sums = dict.fromkeys(("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac"), 0.0)
        n_minibatches, epochs, stop = 0, 0, False
        for _ in range(cfg.update_epochs):
            epochs += 1
            for idx in torch.randperm(cfg.batch_size).split(minibatch):
                _, new_logprob, entropy, new_value = agent.action_and_value(flat["obs"][idx], flat["actions"][idx])
                adv = flat["advantages"][idx]
                if cfg.norm_adv:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                policy_loss = ppo_clip_loss(new_logprob, flat["logprobs"][idx], adv,
                                            cfg.clip_coef if cfg.clip else math.inf)
                if cfg.clip_vloss:
                    value_loss = clipped_value_loss(new_value, flat["values"][idx], flat["returns"][idx],
                                                    cfg.clip_coef)
                else:
                    value_loss = 0.5 * ((new_value - flat["returns"][idx]) ** 2).mean()
                loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy.mean()
                self.optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    log_ratio = new_logprob - flat["logprobs"][idx]
                    approx_kl = ((log_ratio.exp() - 1) - log_ratio).mean().item()   # KL(π_old‖π_new), always ≥ 0
                    sums["clipfrac"] += ((log_ratio.exp() - 1).abs() > cfg.clip_coef).float().mean().item()
                sums["policy_loss"] += policy_loss.item()
                sums["value_loss"] += value_loss.item()
                sums["entropy"] += entropy.mean().item()
                sums["approx_kl"] += approx_kl
                n_minibatches += 1
                if cfg.target_kl is not None and approx_kl > cfg.target_kl:
                    stop = True
                    break
            if stop:
                break
        stats = {k: v / n_minibatches for k, v in sums.items()}
        residual = (flat["returns"] - flat["values"]).var()
        stats["explained_variance"] = float(1 - residual / flat["returns"].var().clamp_min(1e-8))
        stats["epochs"] = epochs
        return stats

    def advance(self, n_updates: int, log=None) -> None:
        """``n_updates`` rounds of collect → learn (stopping at the budget), evaluating every eval_every steps."""
        cfg = self.cfg
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.torch_rng)
            for _ in range(n_updates):
                if self.update >= cfg.num_updates:
                    break
                lr = cfg.lr * (1 - self.update / cfg.num_updates) if cfg.anneal_lr else cfg.lr
                self.optimizer.param_groups[0]["lr"] = lr
                buf = self.collect()
                self.update += 1
                self.step += cfg.batch_size
                stats = self.learn(buf)
                for key, value in {"step": self.step, "lr": lr, **stats}.items():
                    self.history[f"update_{key}"].append(value)
                if self.step // cfg.eval_every > (self.step - cfg.batch_size) // cfg.eval_every:
                    ret = evaluate(self.agent, cfg.env_id, cfg.eval_episodes, seed=10_000)
                    self.history["eval_step"].append(self.step)
                    self.history["eval_return"].append(ret)
                    if ret >= cfg.target_return and self.history["steps_to_target"] is None:
                        self.history["steps_to_target"] = self.step
                    if log:
                        elapsed = self.seconds + time.perf_counter() - start
                        log(f"step {self.step:7,d}  評価の収益 {ret:6.1f}  KL {stats['approx_kl']:.4f}  "
                            f"クリップ率 {stats['clipfrac']:.2f}  経過 {elapsed:4.0f} 秒")
            self.torch_rng = torch.get_rng_state()
        self.seconds += time.perf_counter() - start

    @property
    def done(self) -> bool:
        return self.update >= self.cfg.num_updates

    # ---- checkpoint -------------------------------------------------------------------

    def save(self, directory) -> None:
        tensors = {f"agent.{k}": v for k, v in self.agent.state_dict().items()}
        optim_tensors, optim_groups = optimizer_state_tensors(self.optimizer)
        tensors |= optim_tensors
        tensors["obs"] = self.obs
        tensors["torch_rng"] = self.torch_rng
        tensors["episode_return"] = torch.from_numpy(self.episode_return)
        env_infos = []
        for i, env in enumerate(self.envs.envs):
            array, env_info = env_state(env)
            tensors[f"env{i}.state"] = torch.from_numpy(array)
            env_infos.append(env_info)
        info = {"config": asdict(self.cfg), "update": self.update, "step": self.step, "seconds": self.seconds,
                "history": self.history, "optim_param_groups": optim_groups, "envs": env_infos}
        write_checkpoint(directory, tensors, info)

    @classmethod
    def resume_or_new(cls, cfg: Config, directory) -> Run:
        """The run saved in ``directory`` if it was started with exactly these settings, else a new one."""
        return cls.load(directory) if saved_with_config(directory, asdict(cfg)) else cls(cfg)

    @classmethod
    def load(cls, directory) -> Run:
        tensors, info = read_checkpoint(directory)
        run = cls(Config(**info["config"]))

        def part(prefix):
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        run.agent.load_state_dict(part("agent."))
        load_optimizer_state(run.optimizer, tensors, info["optim_param_groups"])
        run.obs, run.torch_rng = tensors["obs"], tensors["torch_rng"]
        run.episode_return = tensors["episode_return"].numpy().copy()
        run.update, run.step, run.seconds, run.history = info["update"], info["step"], info["seconds"], info["history"]
        for i, (env, env_info) in enumerate(zip(run.envs.envs, info["envs"], strict=True)):
            restore_env_state(env, tensors[f"env{i}.state"].numpy(), env_info)
        return run


def train(cfg: Config, log=None) -> dict:
    """One whole run; returns its history (evaluations, steps to the target, per-update statistics, seconds)."""
    run = Run(cfg)
    run.advance(cfg.num_updates, log=log)
    run.envs.close()
    return run.history | {"seconds": run.seconds}


# =======================================================================================
# Reference runs: PPO, the seed's Monte-Carlo targets, and PPO minus one ingredient at a time

VARIANTS = {
    "ppo": {},
    "mc_normalized": {"advantage": "mc_normalized"},
    "no_norm_adv": {"norm_adv": False},
    "no_clip": {"clip": False},
    "no_anneal": {"anneal_lr": False},
    "clip_vloss": {"clip_vloss": True},
    "ent_coef": {"ent_coef": 0.01},
    "low_lr": {"lr": 2.5e-4},
    "common_defaults": {"lr": 2.5e-4, "num_envs": 4, "ent_coef": 0.01, "clip_vloss": True},   # CleanRL's CartPole
    "acrobot": {"env_id": "Acrobot-v1", "total_steps": 300_000, "target_return": -100.0},
}
RUNS_CSV = "data/ppo_runs.csv"          # inside the package: solutions/data/ppo_runs.csv


def variant_config(variant: str, seed: int, **overrides) -> Config:
    return Config(**{"seed": seed, **VARIANTS[variant], **overrides})


def run_variant(variant: str, seed: int, **overrides) -> list[dict]:
    """One training run; a row per evaluation (step, greedy mean return, seconds so far)."""
    torch.set_num_threads(1)                 # one core per run, so that two runs can share two cores
    run = Run(variant_config(variant, seed, **overrides))
    rows = []
    started = time.perf_counter()

    def record(_message):
        rows.append({"variant": variant, "seed": seed, "step": run.step,
                     "eval_return": run.history["eval_return"][-1],
                     "seconds": round(time.perf_counter() - started, 1)})

    run.advance(run.cfg.num_updates, log=record)
    run.envs.close()
    return rows


def _run_variant_job(args):
    return run_variant(*args)


def write_reference_runs(path, variants=tuple(VARIANTS), seeds=(0, 1, 2), jobs: int = 2) -> None:
    """Every (variant, seed) run, ``jobs`` at a time, written as one long CSV."""
    import multiprocessing as mp

    work = [(v, s) for v in variants for s in seeds]
    with mp.get_context("spawn").Pool(jobs) as pool:
        results = pool.map(_run_variant_job, work, chunksize=1)
    write_runs_csv(path, results)


def read_reference_runs(path=None) -> list[dict]:
    """The stored reference runs (the package's CSV unless ``path`` is given)."""
    return read_runs_csv(RUNS_CSV, path)


def steps_to_target(steps, returns, target: float) -> tuple[int | None, int | None]:
    """(The first evaluation step at or above target, the step from which every later evaluation is.)"""
    steps, above = np.asarray(steps), np.asarray(returns) >= target
    first = int(steps[np.argmax(above)]) if above.any() else None
    below = np.flatnonzero(~above)
    if not len(below):
        return first, int(steps[0])
    return first, (int(steps[below[-1] + 1]) if below[-1] + 1 < len(steps) else None)


if __name__ == "__main__":
    # Regenerates the stored reference runs (about 8 minutes on 2 cores, two runs side by side):
    #   python -m solutions.ppo --out solutions/data/ppo_runs.csv
    import argparse

    parser = argparse.ArgumentParser(
        description="第7章の参照の学習（GAE とモンテカルロ、アブレーション、Acrobot）を実行して CSV に書きます")
    parser.add_argument("--out", default="solutions/data/ppo_runs.csv")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    from solutions.ppo import write_reference_runs as write  # the importable module, so that workers can find it

    write(args.out, args.variants, tuple(args.seeds), args.jobs)
