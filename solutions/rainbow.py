"""Chapter 6: Rainbow DQN on CartPole, one component at a time.

The reference answers (sum tree, C51 projection, factorised noisy layer) and the agent: replay
with priorities, n-step returns flushed at episode end with termination and truncation kept
apart, double Q, dueling, noisy layers, the distributional head. One ``Config`` names every
hyperparameter once; each component can be switched off for the ablation.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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
# Sum tree


class SumTree:
    """Priorities in the leaves of a binary tree whose inner nodes hold the sum of their children.

    ``update`` and ``find`` walk one root-to-leaf path: O(log capacity). Any positive capacity
    works: the leaves fill a power-of-two layer and the unused ones stay at priority 0.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity は 1 以上にしてください（capacity={capacity}）")
        self.capacity = capacity
        self.n_leaves = 1 << (capacity - 1).bit_length()      # 2 のべき乗に切り上げ
        self.tree = np.zeros(2 * self.n_leaves)                # tree[1] が根、葉は tree[n_leaves:]

    def update(self, index: int, priority: float) -> None:
        i = index + self.n_leaves
        self.tree[i] = priority
        i //= 2
        while i >= 1:                                          # 根まで、親を子の和で置き直す
            self.tree[i] = self.tree[2 * i] + self.tree[2 * i + 1]
            i //= 2

    def total(self) -> float:
        return float(self.tree[1])

    def find(self, value: float) -> int:
        """The leaf whose interval [prefix, prefix + priority) contains ``value`` (0 <= value < total())."""
        i = 1
        while i < self.n_leaves:
            left = self.tree[2 * i]
            if value < left or self.tree[2 * i + 1] <= 0:      # 丸め誤差で空の右の部分木に入らない
                i = 2 * i
            else:
                value -= left
                i = 2 * i + 1
        return min(i - self.n_leaves, self.capacity - 1)

    def find_batch(self, values: np.ndarray) -> np.ndarray:
        """``find`` for many values at once: the same walk, one tree level per step for the whole batch.

        Five NumPy calls per level, whatever the batch size. Rounding can (rarely) lead a walk into a
        subtree whose priorities are all 0; those few values are walked again with ``find``.
        """
        start = np.array(values, dtype=np.float64)
        values = start.copy()                                  # the walk subtracts in place
        i = np.ones(len(values), dtype=np.int64)
        for _ in range(self.n_leaves.bit_length() - 1):        # the depth of the tree
            i *= 2                                             # the left child
            left = self.tree[i]
            right = values >= left
            np.subtract(values, left, out=values, where=right)
            i += right                                         # the right child where value >= the left sum
        leaves = i - self.n_leaves
        for k in np.flatnonzero(self.tree[i] <= 0):
            leaves[k] = self.find(float(start[k]))
        return leaves

    def update_batch(self, indices, priorities) -> None:
        """``update`` for many leaves at once, with the same result as calling it in a loop (a repeated
        index keeps its last priority): the leaves first, then, one level at a time, every parent of a
        changed node from its two children. One NumPy call per level instead of one per node."""
        indices = np.asarray(indices, dtype=np.int64)
        last = len(indices) - 1 - np.unique(indices[::-1], return_index=True)[1]
        i = indices[last] + self.n_leaves
        self.tree[i] = np.asarray(priorities, dtype=np.float64)[last]
        while i[0] > 1:                                        # 葉はすべて同じ深さ
            i //= 2                                            # 重複した親は同じ和を 2 度書くだけ
            self.tree[i] = self.tree[2 * i] + self.tree[2 * i + 1]


# =======================================================================================
# The C51 projection


def project_distribution(next_probs: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor,
                         support: torch.Tensor, gamma) -> torch.Tensor:
    """Project r + gamma · z (0 when done) onto the fixed, evenly spaced ``support``.

    next_probs (B, N), rewards and dones (B,), support (N,); ``gamma`` a number or (B,) (already
    raised to the n-th power). Each atom's mass is split between the two neighbouring atoms in
    proportion to the distance; when b lands on an atom, all of it goes to that atom.
    """
    v_min, v_max = support[0].item(), support[-1].item()
    n_atoms = support.numel()
    delta_z = (v_max - v_min) / (n_atoms - 1)
    gamma = torch.as_tensor(gamma, dtype=next_probs.dtype, device=next_probs.device)
    not_done = (~dones.bool()).to(next_probs.dtype)
    tz = rewards[:, None] + (gamma * not_done).reshape(-1, 1) * support[None, :]   # (B, N)
    tz = tz.clamp(v_min, v_max)
    b = (tz - v_min) / delta_z                                # (B, N): 連続な位置
    lower, upper = b.floor().long(), b.ceil().long()
    on_atom = lower == upper                                  # ちょうどアトムの上: 全部をそこへ
    out = torch.zeros_like(next_probs)
    out.scatter_add_(1, lower, next_probs * (upper.to(b.dtype) - b + on_atom.to(b.dtype)))
    out.scatter_add_(1, upper, next_probs * (b - lower.to(b.dtype)))
    return out


# =======================================================================================
# Factorised noisy linear layer (Fortunato et al., 2018)


class NoisyLinear(nn.Module):
    """y = (μ_w + σ_w ⊙ ε_w) x + μ_b + σ_b ⊙ ε_b with factorised noise ε_w = f(ε_out) f(ε_in)ᵀ,
    f(x) = sign(x)·√|x|. In eval mode only the means are used."""

    def __init__(self, in_features: int, out_features: int, std_init: float = 0.5):
        super().__init__()
        self.in_features, self.out_features, self.std_init = in_features, out_features, std_init
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_sigma = nn.Parameter(torch.empty(out_features, in_features))
        self.bias_mu = nn.Parameter(torch.empty(out_features))
        self.bias_sigma = nn.Parameter(torch.empty(out_features))
        self.register_buffer("weight_epsilon", torch.zeros(out_features, in_features))
        self.register_buffer("bias_epsilon", torch.zeros(out_features))
        bound = 1 / math.sqrt(in_features)
        with torch.no_grad():
            self.weight_mu.uniform_(-bound, bound)
            self.bias_mu.uniform_(-bound, bound)
            self.weight_sigma.fill_(std_init / math.sqrt(in_features))
            self.bias_sigma.fill_(std_init / math.sqrt(in_features))
        self.reset_noise()

    @staticmethod
    def _f(x: torch.Tensor) -> torch.Tensor:
        return x.sign() * x.abs().sqrt()

    @torch.no_grad()
    def reset_noise(self) -> None:
        eps_in = self._f(torch.randn(self.in_features, device=self.weight_mu.device))
        eps_out = self._f(torch.randn(self.out_features, device=self.weight_mu.device))
        self.weight_epsilon.copy_(torch.outer(eps_out, eps_in))      # 階数 1 の雑音
        self.bias_epsilon.copy_(eps_out)

    def forward(self, x):
        if not self.training:
            return F.linear(x, self.weight_mu, self.bias_mu)
        weight = self.weight_mu + self.weight_sigma * self.weight_epsilon
        bias = self.bias_mu + self.bias_sigma * self.bias_epsilon
        return F.linear(x, weight, bias)


# =======================================================================================
# Settings


@dataclass
class Config:
    """Every hyperparameter of the agent, named once. The switches turn Rainbow's components off."""

    env_id: str = "CartPole-v1"
    total_steps: int = 30_000         # β の焼きなましもこの長さで 1 に達する
    learning_starts: int = 1_000
    buffer_size: int = 50_000
    batch_size: int = 64
    lr: float = 1e-3
    adam_eps: float = 1.5e-4
    gamma: float = 0.99
    target_update: int = 500          # 環境のステップ数
    train_every: int = 1
    hidden: int = 128
    grad_clip: float = 10.0
    n_step: int = 3
    alpha: float = 0.5                # 優先度の指数
    beta_start: float = 0.4           # 重要度サンプリング重みの指数（1 まで線形に上げる）
    priority_eps: float = 1e-6
    n_atoms: int = 51
    v_min: float = 0.0
    v_max: float = 100.0
    noisy_std: float = 0.5
    eps_start: float = 1.0            # noisy を切ったときの ε-greedy
    eps_end: float = 0.01
    eps_decay_steps: int = 10_000
    eval_every: int = 2_500
    eval_episodes: int = 20
    target_return: float = 475.0
    seed: int = 0
    # Rainbow の部品（False で切る）
    double: bool = True
    prioritized: bool = True
    dueling: bool = True
    noisy: bool = True
    distributional: bool = True
    multi_step: bool = True


# =======================================================================================
# Network


class QNetwork(nn.Module):
    """MLP torso, then a plain or dueling head of plain or noisy layers, scalar or distributional."""

    def __init__(self, obs_dim: int, n_actions: int, cfg: Config):
        super().__init__()
        self.n_actions, self.cfg = n_actions, cfg
        self.n_out = cfg.n_atoms if cfg.distributional else 1
        layer = (lambda i, o: NoisyLinear(i, o, cfg.noisy_std)) if cfg.noisy else nn.Linear
        self.torso = nn.Sequential(nn.Linear(obs_dim, cfg.hidden), nn.ReLU())
        if cfg.dueling:
            self.value = nn.Sequential(layer(cfg.hidden, cfg.hidden), nn.ReLU(), layer(cfg.hidden, self.n_out))
        self.advantage = nn.Sequential(layer(cfg.hidden, cfg.hidden), nn.ReLU(),
                                       layer(cfg.hidden, n_actions * self.n_out))
        self.register_buffer("support", torch.linspace(cfg.v_min, cfg.v_max, cfg.n_atoms))

    def forward(self, obs):
        """Logits (B, A, N) when distributional, else Q-values (B, A, 1)."""
        h = self.torso(obs)
        a = self.advantage(h).view(-1, self.n_actions, self.n_out)
        if self.cfg.dueling:
            v = self.value(h).view(-1, 1, self.n_out)
            return v + a - a.mean(dim=1, keepdim=True)          # 分布型では softmax の前（ロジット）で合成
        return a

    def q_values(self, obs):
        out = self(obs)
        if self.cfg.distributional:
            return (out.softmax(dim=-1) * self.support).sum(-1)  # (B, A)
        return out.squeeze(-1)

    def reset_noise(self):
        for m in self.modules():
            if isinstance(m, NoisyLinear):
                m.reset_noise()


# =======================================================================================
# Replay with n-step returns and priorities


class NStepAccumulator:
    """Turns 1-step transitions into n-step ones: (s_t, a_t, Σ γ^i r_{t+i}, s_{t+k}, terminated, γ^k).

    At the end of an episode the unfinished ones are flushed with k < n steps: after a termination
    they do not bootstrap; after a truncation they bootstrap from the last observation with γ^k.
    """

    def __init__(self, n: int, gamma: float):
        self.n, self.gamma = n, gamma
        self.pending: deque = deque()

    def push(self, obs, action, reward, next_obs, terminated: bool, truncated: bool) -> list[tuple]:
        self.pending.append((obs, action, reward))
        out = []
        if len(self.pending) == self.n and not terminated:
            out.append(self._emit(next_obs, terminated=False))
            self.pending.popleft()
        if terminated or truncated:
            while self.pending:
                out.append(self._emit(next_obs, terminated))
                self.pending.popleft()
        return out

    def _emit(self, next_obs, terminated: bool) -> tuple:
        ret = sum(self.gamma ** i * r for i, (_, _, r) in enumerate(self.pending))
        obs, action, _ = self.pending[0]
        return obs, action, ret, next_obs, terminated, self.gamma ** len(self.pending)


class ReplayBuffer:
    """A ring buffer of n-step transitions; with ``prioritized`` a sum tree of priorities^alpha,
    stratified sampling and importance-sampling weights, new transitions at the current maximum."""

    def __init__(self, capacity: int, obs_dim: int, prioritized: bool, alpha: float, rng: np.random.Generator):
        self.capacity, self.prioritized, self.alpha, self.rng = capacity, prioritized, alpha, rng
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.returns = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.bool_)
        self.discounts = np.zeros(capacity, dtype=np.float32)
        self.pos, self.size = 0, 0
        self.tree = SumTree(capacity) if prioritized else None
        self.max_priority = 1.0

    def add(self, obs, action, ret, next_obs, terminated, discount) -> None:
        i = self.pos
        self.obs[i], self.actions[i], self.returns[i] = obs, action, ret
        self.next_obs[i], self.terminated[i], self.discounts[i] = next_obs, terminated, discount
        if self.tree is not None:
            self.tree.update(i, self.max_priority ** self.alpha)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, beta: float):
        if self.tree is None:
            idx = self.rng.integers(0, self.size, size=batch_size)
            weights = np.ones(batch_size, dtype=np.float32)
        else:
            total = self.tree.total()
            edges = np.linspace(0.0, total, batch_size + 1)
            values = self.rng.uniform(edges[:-1], edges[1:])            # 層化: 区間ごとに 1 つ
            idx = self.tree.find_batch(np.minimum(values, np.nextafter(total, 0)))
            probs = self.tree.tree[idx + self.tree.n_leaves] / total
            weights = (self.size * probs) ** (-beta)
            weights = (weights / weights.max()).astype(np.float32)
        batch = {"obs": self.obs[idx], "actions": self.actions[idx], "returns": self.returns[idx],
                 "next_obs": self.next_obs[idx], "terminated": self.terminated[idx],
                 "discounts": self.discounts[idx], "weights": weights}
        return idx, {k: torch.as_tensor(v) for k, v in batch.items()}

    def update_priorities(self, idx, priorities) -> None:
        if self.tree is None:
            return
        priorities = [float(p) for p in priorities]
        self.tree.update_batch(idx, [p ** self.alpha for p in priorities])
        self.max_priority = max(self.max_priority, *priorities)


# =======================================================================================
# Agent


class Agent:
    def __init__(self, obs_dim: int, n_actions: int, cfg: Config):
        self.cfg, self.n_actions = cfg, n_actions
        torch.manual_seed(cfg.seed)
        self.online = QNetwork(obs_dim, n_actions, cfg)
        self.target = QNetwork(obs_dim, n_actions, cfg)
        self.target.load_state_dict(self.online.state_dict())
        # foreach: one call per step for all parameters (the same numbers as the per-tensor loop, faster on CPU)
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=cfg.lr, eps=cfg.adam_eps, foreach=True)
        self.rng = np.random.default_rng(cfg.seed)

    @torch.no_grad()
    def act(self, obs, step: int, greedy: bool = False) -> int:
        if not greedy and step <= self.cfg.learning_starts:
            # 学習を始めるまでは一様にでたらめに動き、バッファにどの行動の遷移も入れる（雑音はまだ
            # 引き直されないので、ノイジーネットワークに任せると同じ行動ばかりになる）
            return int(self.rng.integers(self.n_actions))
        if not self.cfg.noisy and not greedy:
            frac = min(1.0, step / self.cfg.eps_decay_steps)
            eps = self.cfg.eps_start + frac * (self.cfg.eps_end - self.cfg.eps_start)
            if self.rng.random() < eps:
                return int(self.rng.integers(self.n_actions))
        if greedy:                                                  # eval では雑音なし（平均の重み）
            return int(self.greedy_actions(np.asarray(obs)[None])[0])
        self.online.train()
        q = self.online.q_values(torch.as_tensor(obs, dtype=torch.float32)[None])
        return int(q.argmax(1).item())

    @torch.no_grad()
    def greedy_actions(self, obs) -> np.ndarray:
        """``act(..., greedy=True)`` for a batch of observations (n, obs_dim): eval mode, mean weights."""
        self.online.eval()
        q = self.online.q_values(torch.as_tensor(np.asarray(obs), dtype=torch.float32))
        self.online.train()
        return q.argmax(1).numpy()

    def loss(self, batch):
        """Per-sample losses (B,); ``train_step`` averages them with the IS weights and also uses them as priorities."""
        cfg = self.cfg
        obs, actions, next_obs = batch["obs"], batch["actions"], batch["next_obs"]
        rewards, dones, discounts = batch["returns"], batch["terminated"], batch["discounts"]
        with torch.no_grad():
            online_next = self.online.q_values(next_obs) if cfg.double else self.target.q_values(next_obs)
            next_actions = online_next.argmax(1)                    # double: 行動は online で選ぶ
            if cfg.distributional:
                next_probs = self.target(next_obs).softmax(-1)[torch.arange(len(obs)), next_actions]   # (B, N)
                target = project_distribution(next_probs, rewards, dones, self.target.support, discounts)
            else:
                next_q = self.target.q_values(next_obs).gather(1, next_actions[:, None]).squeeze(1)
                target = rewards + discounts * (~dones).float() * next_q
        out = self.online(obs)[torch.arange(len(obs)), actions]     # (B, N) or (B, 1)
        if cfg.distributional:
            per_sample = -(target * out.log_softmax(-1)).sum(-1)    # 交差エントロピー
        else:
            per_sample = F.smooth_l1_loss(out.squeeze(-1), target, reduction="none")   # Huber
        return per_sample

    def train_step(self, buffer: ReplayBuffer, step: int) -> float:
        cfg = self.cfg
        beta = min(1.0, cfg.beta_start + (1 - cfg.beta_start) * step / cfg.total_steps)
        idx, batch = buffer.sample(cfg.batch_size, beta)
        per_sample = self.loss(batch)
        loss = (batch["weights"] * per_sample).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.online.parameters(), cfg.grad_clip)
        self.optimizer.step()
        buffer.update_priorities(idx, per_sample.detach().abs().numpy() + cfg.priority_eps)
        if cfg.noisy:
            self.online.reset_noise()                               # 更新のたびに雑音を引き直す
            self.target.reset_noise()
        return loss.item()


def evaluate(agent: Agent, env_id: str, episodes: int, seed: int) -> float:
    """Greedy mean return: eval mode, the noisy layers' mean weights, no ε."""
    return evaluate_policy(agent.greedy_actions, env_id, episodes, seed)


class Run:
    """One training run that can stop and go on: every piece of state lives here, and
    ``save``/``load`` write it as safetensors (tensors and arrays) plus JSON (numbers, RNG states),
    never a pickle."""

    def __init__(self, cfg: Config):
        import gymnasium as gym

        self.cfg = cfg
        self.env = gym.make(cfg.env_id)
        self.obs, _ = self.env.reset(seed=cfg.seed)
        self.env.action_space.seed(cfg.seed)
        obs_dim, n_actions = self.env.observation_space.shape[0], self.env.action_space.n
        self.agent = Agent(obs_dim, n_actions, cfg)
        self.buffer = ReplayBuffer(cfg.buffer_size, obs_dim, cfg.prioritized, cfg.alpha, self.agent.rng)
        self.nstep = NStepAccumulator(cfg.n_step if cfg.multi_step else 1, cfg.gamma)
        self.step, self.episode_return, self.seconds = 0, 0.0, 0.0
        self.history = {"eval_step": [], "eval_return": [], "episode_return": [], "episode_end": [],
                        "loss": [], "steps_to_target": None}

    def advance(self, n_steps: int, log=None) -> None:
        cfg, agent, buffer = self.cfg, self.agent, self.buffer
        start = time.perf_counter()
        for _ in range(n_steps):
            self.step += 1
            step = self.step
            action = agent.act(self.obs, step)
            next_obs, reward, terminated, truncated, _ = self.env.step(action)
            for transition in self.nstep.push(self.obs, action, float(reward), next_obs, terminated, truncated):
                buffer.add(*transition)
            self.episode_return += float(reward)
            self.obs = next_obs
            if terminated or truncated:
                self.history["episode_return"].append(self.episode_return)
                self.history["episode_end"].append(step)
                self.obs, _ = self.env.reset()
                self.episode_return = 0.0
            if step > cfg.learning_starts and step % cfg.train_every == 0:
                self.history["loss"].append(agent.train_step(buffer, step))
            if step % cfg.target_update == 0:
                agent.target.load_state_dict(agent.online.state_dict())
            if step % cfg.eval_every == 0:
                ret = evaluate(agent, cfg.env_id, cfg.eval_episodes, seed=10_000)
                self.history["eval_step"].append(step)
                self.history["eval_return"].append(ret)
                if log:
                    elapsed = self.seconds + time.perf_counter() - start
                    log(f"step {step:6d}  評価の収益 {ret:6.1f}  経過 {elapsed:5.0f} 秒")
                if ret >= cfg.target_return and self.history["steps_to_target"] is None:
                    self.history["steps_to_target"] = step
        self.seconds += time.perf_counter() - start

    # ---- checkpoint -------------------------------------------------------------------

    def save(self, directory) -> None:
        tensors = {f"online.{k}": v for k, v in self.agent.online.state_dict().items()}
        tensors |= {f"target.{k}": v for k, v in self.agent.target.state_dict().items()}
        optim_tensors, optim_groups = optimizer_state_tensors(self.agent.optimizer)
        tensors |= optim_tensors
        b = self.buffer
        for name in ("obs", "next_obs", "actions", "returns", "terminated", "discounts"):
            tensors[f"buffer.{name}"] = torch.from_numpy(getattr(b, name).copy())
        if b.tree is not None:
            tensors["buffer.tree"] = torch.from_numpy(b.tree.tree.copy())
        pending = list(self.nstep.pending)
        if pending:
            tensors["nstep.obs"] = torch.from_numpy(np.stack([o for o, _, _ in pending]).astype(np.float32))
        tensors["obs"] = torch.from_numpy(np.asarray(self.obs, dtype=np.float32))
        tensors["torch_rng"] = torch.get_rng_state()
        env_array, env_info = env_state(self.env)
        tensors["env.state"] = torch.from_numpy(env_array)
        info = {"config": asdict(self.cfg), "step": self.step, "episode_return": self.episode_return,
                "seconds": self.seconds, "history": self.history,
                "optim_param_groups": optim_groups,
                "buffer": {"pos": b.pos, "size": b.size, "max_priority": b.max_priority},
                "nstep": [[a, r] for _, a, r in pending],
                "numpy_rng": self.agent.rng.bit_generator.state,
                "env": env_info}
        write_checkpoint(directory, tensors, info)

    @classmethod
    def resume_or_new(cls, cfg: Config, directory) -> Run:
        """The run saved in ``directory`` if it was started with exactly these settings, else a new one."""
        return cls.load(directory) if saved_with_config(directory, asdict(cfg)) else cls(cfg)

    @classmethod
    def load(cls, directory) -> Run:
        tensors, info = read_checkpoint(directory)
        run = cls(Config(**info["config"]))
        agent, b = run.agent, run.buffer

        def part(prefix):
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        agent.online.load_state_dict(part("online."))
        agent.target.load_state_dict(part("target."))
        load_optimizer_state(agent.optimizer, tensors, info["optim_param_groups"])
        for name in ("obs", "next_obs", "actions", "returns", "terminated", "discounts"):
            getattr(b, name)[:] = tensors[f"buffer.{name}"].numpy()
        if b.tree is not None:
            b.tree.tree[:] = tensors["buffer.tree"].numpy()
        b.pos, b.size, b.max_priority = info["buffer"]["pos"], info["buffer"]["size"], info["buffer"]["max_priority"]
        run.nstep.pending.clear()
        for o, (a, r) in zip(tensors.get("nstep.obs", torch.zeros(0)).numpy(), info["nstep"], strict=True):
            run.nstep.pending.append((o, a, r))
        run.obs = tensors["obs"].numpy()
        run.step, run.episode_return, run.seconds = info["step"], info["episode_return"], info["seconds"]
        run.history = info["history"]
        agent.rng.bit_generator.state = info["numpy_rng"]
        torch.set_rng_state(tensors["torch_rng"])
        restore_env_state(run.env, tensors["env.state"].numpy(), info["env"])
        return run


# =======================================================================================
# Sampling cost: the sum tree against sampling over all priorities


def seed_style_sample(priorities: np.ndarray, batch_size: int, rng: np.random.Generator,
                      alpha: float = 0.6) -> np.ndarray:
    """Sampling as the seed listing does: raise every stored priority to alpha, normalise, and let
    np.random.choice build the cumulative sums: O(N) per batch."""
    probs = priorities ** alpha
    probs /= probs.sum()
    return rng.choice(len(priorities), size=batch_size, p=probs)


def sampling_times_ms(sizes=(10_000, 100_000, 1_000_000), batch_size: int = 32, repeats: int = 20,
                      seed: int = 0) -> dict[int, tuple[float, float]]:
    """Median ms per batch of ``batch_size`` for (O(N) sampling, sum tree) at each buffer size."""
    import statistics

    rng = np.random.default_rng(seed)
    out = {}
    for n in sizes:
        priorities = rng.uniform(0.1, 1.0, n).astype(np.float32)
        tree = SumTree(n)
        tree.tree[tree.n_leaves:tree.n_leaves + n] = priorities ** 0.6        # fill the leaves, then the sums bottom-up
        for i in range(tree.n_leaves - 1, 0, -1):
            tree.tree[i] = tree.tree[2 * i] + tree.tree[2 * i + 1]
        flat, with_tree = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            seed_style_sample(priorities, batch_size, rng)
            flat.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            total = tree.total()
            edges = np.linspace(0.0, total, batch_size + 1)
            tree.find_batch(rng.uniform(edges[:-1], edges[1:]))
            with_tree.append((time.perf_counter() - start) * 1000)
        out[n] = (statistics.median(flat), statistics.median(with_tree))
    return out


# =======================================================================================
# Ablation: Rainbow minus one component at a time, and plain DQN

COMPONENTS = ("double", "prioritized", "multi_step", "dueling", "noisy", "distributional")
VARIANTS = {"rainbow": {}, **{f"no_{c}": {c: False} for c in COMPONENTS},
            "dqn": dict.fromkeys(COMPONENTS, False)}
RUNS_CSV = "data/rainbow_runs.csv"          # inside the package: solutions/data/rainbow_runs.csv


def variant_config(variant: str, seed: int, total_steps: int, **overrides) -> Config:
    return Config(seed=seed, total_steps=total_steps, **VARIANTS[variant], **overrides)


def run_variant(variant: str, seed: int, total_steps: int, **overrides) -> list[dict]:
    """One training run; a row per evaluation (step, greedy mean return, seconds so far)."""
    torch.set_num_threads(1)                 # one core per run, so that two runs can share two cores
    run = Run(variant_config(variant, seed, total_steps, **overrides))
    rows = []

    def record(_message):
        rows.append({"variant": variant, "seed": seed, "step": run.step,
                     "eval_return": run.history["eval_return"][-1],
                     "seconds": round(time.perf_counter() - started, 1)})

    started = time.perf_counter()
    run.advance(total_steps, log=record)
    return rows


def _run_variant_job(args):
    return run_variant(*args)


def write_reference_runs(path, variants=tuple(VARIANTS), seeds=(0, 1, 2), total_steps: int = 30_000,
                         jobs: int = 2) -> None:
    """Every (variant, seed) run, ``jobs`` at a time, written as one long CSV."""
    import multiprocessing as mp

    work = [(v, s, total_steps) for v in variants for s in seeds]
    with mp.get_context("spawn").Pool(jobs) as pool:
        results = pool.map(_run_variant_job, work, chunksize=1)
    write_runs_csv(path, results)


def read_reference_runs(path=None) -> list[dict]:
    """The stored reference runs (the package's CSV unless ``path`` is given)."""
    return read_runs_csv(RUNS_CSV, path)


if __name__ == "__main__":
    # Regenerates the stored reference runs (about 25 minutes on 2 cores):
    #   python -m solutions.rainbow --out solutions/data/rainbow_runs.csv
    import argparse

    parser = argparse.ArgumentParser(description="第6章の参照の学習（アブレーション）を実行して CSV に書きます")
    parser.add_argument("--out", default="solutions/data/rainbow_runs.csv")
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    from solutions.rainbow import write_reference_runs as write  # the importable module, so that workers can find it

    write(args.out, args.variants, tuple(args.seeds), args.steps, args.jobs)
