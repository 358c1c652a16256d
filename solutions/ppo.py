"""Chapter 7 (work in progress, not yet in _toc.yml): PPO with GAE on gymnasium vector environments.

The reference answers (GAE, the clipped surrogate loss) and the agent: an actor-critic with
orthogonal initialisation and a categorical policy on logits, rollouts from vector environments in
the SAME_STEP autoreset mode (the final observation of an episode arrives with the step that ended
it, so no fake transition is stored), truncation bootstrapped from that final observation's value,
termination not.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical

from .instruments import evaluate_policy

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
        running = rewards[t] + gamma * running * (1.0 - dones[t])
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
# Settings and training


@dataclass
class Config:
    env_id: str = "CartPole-v1"
    total_steps: int = 150_000
    num_envs: int = 8
    num_steps: int = 128             # rollout length per environment
    lr: float = 2.5e-3
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    norm_adv: bool = True
    clip: bool = True                # False: the plain surrogate ρA (no clipping)
    clip_coef: float = 0.2
    advantage: str = "gae"           # "gae" or "mc_normalized" (the seed listing's normalised Monte-Carlo returns)
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 64
    eval_every: int = 10_240
    eval_episodes: int = 20
    target_return: float = 475.0
    seed: int = 0


def evaluate(agent: ActorCritic, env_id: str, episodes: int, seed: int) -> float:
    """Greedy mean return: the most likely action of the policy."""

    @torch.no_grad()
    def act(obs):
        return int(agent.actor(torch.as_tensor(obs, dtype=torch.float32)[None]).argmax(-1))

    return evaluate_policy(act, env_id, episodes, seed)


def train(cfg: Config, log=None) -> dict:
    """One PPO run; returns the history (evaluation steps and returns, steps to the target, seconds)."""
    import gymnasium as gym

    torch.manual_seed(cfg.seed)
    envs = gym.make_vec(cfg.env_id, num_envs=cfg.num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    obs_dim, n_actions = envs.single_observation_space.shape[0], envs.single_action_space.n
    agent = ActorCritic(obs_dim, n_actions, cfg.hidden)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=1e-5)
    batch = cfg.num_envs * cfg.num_steps
    minibatch = batch // cfg.num_minibatches
    n_updates = cfg.total_steps // batch
    obs_buf = torch.zeros(cfg.num_steps, cfg.num_envs, obs_dim)
    act_buf = torch.zeros(cfg.num_steps, cfg.num_envs, dtype=torch.long)
    logp_buf, rew_buf, done_buf, val_buf = (torch.zeros(cfg.num_steps, cfg.num_envs) for _ in range(4))
    obs = torch.as_tensor(envs.reset(seed=cfg.seed)[0], dtype=torch.float32)
    history = {"eval_step": [], "eval_return": [], "steps_to_target": None}
    step, start, next_eval = 0, time.perf_counter(), cfg.eval_every
    for update in range(n_updates):
        if cfg.anneal_lr:
            optimizer.param_groups[0]["lr"] = cfg.lr * (1 - update / n_updates)
        for t in range(cfg.num_steps):
            with torch.no_grad():
                action, logp, _, value = agent.action_and_value(obs)
            next_obs, reward, terminated, truncated, info = envs.step(action.numpy())
            reward = torch.as_tensor(reward, dtype=torch.float32)
            if truncated.any():                      # bootstrap from the final observation, not the reset one
                final = np.stack([info["final_obs"][i] for i in np.flatnonzero(truncated)])
                with torch.no_grad():
                    reward[truncated] += cfg.gamma * agent.value(torch.as_tensor(final, dtype=torch.float32))
            obs_buf[t], act_buf[t], logp_buf[t], val_buf[t], rew_buf[t] = obs, action, logp, value, reward
            done_buf[t] = torch.as_tensor(terminated | truncated, dtype=torch.float32)   # the trace stops here
            obs = torch.as_tensor(next_obs, dtype=torch.float32)
        step += batch
        with torch.no_grad():
            if cfg.advantage == "gae":
                advantages, returns = compute_gae(rew_buf, val_buf, done_buf, agent.value(obs), cfg.gamma,
                                                  cfg.gae_lambda)
            else:
                returns = monte_carlo_returns(rew_buf, done_buf, cfg.gamma)
                returns = (returns - returns.mean()) / (returns.std() + 1e-5)
                advantages = returns - val_buf
        b_obs, b_act, b_logp = obs_buf.reshape(batch, -1), act_buf.reshape(-1), logp_buf.reshape(-1)
        b_adv, b_ret = advantages.reshape(-1), returns.reshape(-1)
        for _ in range(cfg.update_epochs):
            for idx in torch.randperm(batch).split(minibatch):
                _, new_logp, entropy, new_value = agent.action_and_value(b_obs[idx], b_act[idx])
                adv = b_adv[idx]
                if cfg.norm_adv:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                loss = (ppo_clip_loss(new_logp, b_logp[idx], adv, cfg.clip_coef if cfg.clip else math.inf)
                        + cfg.vf_coef * 0.5 * ((new_value - b_ret[idx]) ** 2).mean()
                        - cfg.ent_coef * entropy.mean())
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
                optimizer.step()
        if step >= next_eval:
            next_eval += cfg.eval_every
            ret = evaluate(agent, cfg.env_id, cfg.eval_episodes, seed=10_000)
            history["eval_step"].append(step)
            history["eval_return"].append(ret)
            if log:
                log(f"step {step:7d}  評価の収益 {ret:6.1f}  経過 {time.perf_counter() - start:5.0f} 秒")
            if ret >= cfg.target_return and history["steps_to_target"] is None:
                history["steps_to_target"] = step
    envs.close()
    history["seconds"] = time.perf_counter() - start
    return history
