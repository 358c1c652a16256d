"""Chapter 7's parts against plain definitions.

GAE against its definition as a sum of discounted TD errors cut at episode ends, and against the
λ = 1 (discounted return bootstrapped at the end) and λ = 0 (one-step TD error) identities, with
dones in the middle of the rollout; the clipped surrogate at ratios inside and outside [1 − ε, 1 + ε]
for positive and negative advantages; the rollout over vector environments (truncation bootstrapped
from the final observation, termination not, no fake transition after an autoreset) on tiny
environments whose every number is known; the update statistics, the target-KL stop, and a resumed
run that reproduces an uninterrupted one bit for bit.
"""

import math
from typing import ClassVar

import numpy as np
import pytest
import torch

from solutions import ppo


def rollout(seed=0, T=9, N=3):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(T, N, generator=g, dtype=torch.float64)
    values = torch.randn(T, N, generator=g, dtype=torch.float64)
    dones = torch.zeros(T, N, dtype=torch.bool)
    dones[2, 0] = dones[6, 0] = dones[4, 1] = dones[T - 1, 2] = True     # ends mid-rollout and at the last step
    last_value = torch.randn(N, generator=g, dtype=torch.float64)
    return rewards, values, dones, last_value


def gae_by_definition(rewards, values, dones, last_value, gamma, lam):
    """A_t = Σ_l (γλ)^l δ_{t+l}, the sum stopped after the step where the episode ends."""
    T, N = rewards.shape
    out = torch.zeros(T, N, dtype=torch.float64)
    for n in range(N):
        for t in range(T):
            total, factor = 0.0, 1.0
            for k in range(t, T):
                next_value = last_value[n] if k == T - 1 else values[k + 1, n]
                delta = rewards[k, n] + gamma * next_value * (not dones[k, n]) - values[k, n]
                total += factor * delta
                if dones[k, n]:
                    break
                factor *= gamma * lam
            out[t, n] = total
    return out


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
def test_gae_equals_the_sum_of_discounted_td_errors(lam):
    rewards, values, dones, last_value = rollout()
    adv, ret = ppo.compute_gae(rewards, values, dones, last_value, 0.9, lam)
    torch.testing.assert_close(adv, gae_by_definition(rewards, values, dones, last_value, 0.9, lam))
    torch.testing.assert_close(ret, adv + values)


def test_gae_identities_for_lambda_one_and_zero():
    rewards, values, dones, last_value = rollout(seed=1)
    gamma, T = 0.9, rewards.shape[0]
    _, returns = ppo.compute_gae(rewards, values, dones, last_value, gamma, 1.0)
    for n in range(rewards.shape[1]):                     # λ = 1: the discounted return, bootstrapped at the end
        g = last_value[n].item()
        for t in reversed(range(T)):
            g = rewards[t, n].item() + gamma * g * (not dones[t, n])
            assert returns[t, n].item() == pytest.approx(g)
    adv0, _ = ppo.compute_gae(rewards, values, dones, last_value, gamma, 0.0)
    next_values = torch.cat([values[1:], last_value[None]])
    torch.testing.assert_close(adv0, rewards + gamma * next_values * (~dones) - values)   # λ = 0: the TD error


@pytest.mark.parametrize("advantage", [2.0, -2.0])
@pytest.mark.parametrize("ratio", [0.5, 0.9, 1.0, 1.1, 1.5])
def test_clip_loss_matches_its_formula(ratio, advantage):
    eps = 0.2
    new, old = torch.tensor([math.log(ratio)]), torch.tensor([0.0])
    loss = ppo.ppo_clip_loss(new, old, torch.tensor([advantage]), eps)
    expected = -min(ratio * advantage, min(max(ratio, 1 - eps), 1 + eps) * advantage)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_same_step_autoreset_gives_the_final_observation_and_no_fake_step():
    gym = pytest.importorskip("gymnasium")
    envs = gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    obs, _ = envs.reset(seed=0)
    for _ in range(100):
        obs, reward, terminated, _truncated, info = envs.step([0, 0])      # always push left: ends in ~10 steps
        assert (reward == 1.0).all()                                         # no reward-0 reset step
        if terminated.any():
            i = int(terminated.argmax())
            assert abs(info["final_obs"][i][2]) > 0.2 or abs(info["final_obs"][i][0]) > 2.4   # the failed state
            assert abs(obs[i][2]) < 0.05                                     # obs is already the reset state
            break
    else:
        pytest.fail("no episode ended")


def test_seed_style_monte_carlo_returns_restart_at_dones_and_do_not_bootstrap():
    rewards = torch.ones(4, 1)
    dones = torch.tensor([[False], [True], [False], [False]])
    returns = ppo.monte_carlo_returns(rewards, dones, 0.5)
    torch.testing.assert_close(returns[:, 0], torch.tensor([1.5, 1.0, 1.5, 1.0]))   # the last episode is cut off


# ---------------------------------------------------------------------------------------
# The rollout: truncation bootstrapped from the final observation, termination not, no fake step


class Counter:
    """A tiny environment: the observation is the step count / 10, every step pays 1; it terminates
    at ``terminate_at`` steps (if given), and the TimeLimit of its registration truncates it."""

    def __init__(self, terminate_at=None):
        import gymnasium as gym

        self.observation_space = gym.spaces.Box(0.0, 100.0, (1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.terminate_at = terminate_at
        self.k = 0

    def reset(self, *, seed=None, options=None):
        self.k = 0
        return np.array([0.0], dtype=np.float32), {}

    def step(self, action):
        self.k += 1
        return (np.array([self.k / 10], dtype=np.float32), 1.0, self.k == self.terminate_at, False, {})


def _counter_class():
    gym = pytest.importorskip("gymnasium")

    class CounterEnv(Counter, gym.Env):
        metadata: ClassVar[dict] = {"render_modes": []}

    return gym, CounterEnv


@pytest.fixture(scope="module")
def counter_envs():
    gym, CounterEnv = _counter_class()
    gym.register("BookTruncCounter-v0", entry_point=CounterEnv, max_episode_steps=5)
    gym.register("BookTermCounter-v0", entry_point=CounterEnv, max_episode_steps=100, kwargs={"terminate_at": 3})
    yield
    for env_id in ("BookTruncCounter-v0", "BookTermCounter-v0"):
        gym.registry.pop(env_id, None)


def test_rollout_bootstraps_truncation_from_the_final_observation(counter_envs):
    run = ppo.Run(ppo.Config(env_id="BookTruncCounter-v0", num_envs=2, num_steps=12, total_steps=24))
    buf = run.collect()
    with torch.no_grad():
        v_final = run.agent.value(torch.tensor([[0.5]])).item()
    expected_obs = torch.tensor([k % 5 / 10 for k in range(12)])
    for n in range(2):
        torch.testing.assert_close(buf["obs"][:, n, 0], expected_obs)       # after step 5 comes the reset state 0.0
        assert buf["dones"][:, n].tolist() == [k % 5 == 4 for k in range(12)]
        for t in range(12):
            expected = 1.0 + (0.99 * v_final if t % 5 == 4 else 0.0)
            assert buf["rewards"][t, n].item() == pytest.approx(expected, abs=1e-6)
    assert not torch.isclose(buf["obs"], torch.tensor(0.5)).any()             # the final observation is never a state
    assert run.history["episode_return"] == [5.0] * 4                          # the true returns, without the bootstrap


def test_rollout_does_not_bootstrap_termination(counter_envs):
    run = ppo.Run(ppo.Config(env_id="BookTermCounter-v0", num_envs=1, num_steps=7, total_steps=7))
    buf = run.collect()
    assert buf["dones"][:, 0].tolist() == [k % 3 == 2 for k in range(7)]
    assert buf["rewards"][:, 0].tolist() == [1.0] * 7
    torch.testing.assert_close(buf["obs"][:, 0, 0], torch.tensor([k % 3 / 10 for k in range(7)]))
    with torch.no_grad():
        last = run.agent.value(torch.tensor([[0.1]]))                           # the state after the rollout: k = 1
    adv, _ = ppo.compute_gae(buf["rewards"], buf["values"], buf["dones"], last, 0.99, 0.95)
    torch.testing.assert_close(buf["advantages"], adv)


# ---------------------------------------------------------------------------------------
# Learning statistics, target KL, checkpoint and resume


def small_config(**overrides):
    return ppo.Config(num_envs=2, num_steps=32, total_steps=640, eval_every=320, eval_episodes=2, **overrides)


def test_update_statistics_and_target_kl_stop():
    pytest.importorskip("gymnasium")
    torch.set_num_threads(1)
    run = ppo.Run(small_config())
    run.advance(5)
    h = run.history
    assert h["update_step"] == [64, 128, 192, 256, 320] and h["update_epochs"] == [4] * 5
    assert all(k >= 0 for k in h["update_approx_kl"]) and all(0 <= c <= 1 for c in h["update_clipfrac"])
    assert h["update_lr"][0] == pytest.approx(2.5e-3) and h["update_lr"][1] == pytest.approx(2.5e-3 * 0.9)
    assert h["eval_step"] == [320]
    stopped = ppo.Run(small_config(target_kl=1e-9))
    stopped.advance(3)
    assert stopped.history["update_epochs"] == [1, 1, 1]        # stops after the first minibatch that moves the policy


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    pytest.importorskip("gymnasium")
    torch.set_num_threads(1)
    whole = ppo.Run(small_config())
    whole.advance(10)
    first = ppo.Run(small_config())
    first.advance(4)
    first.save(tmp_path / "ckpt")
    torch.rand(5)                                                  # other work between the two halves
    resumed = ppo.Run.resume_or_new(small_config(), tmp_path / "ckpt")
    assert resumed.step == 256 and resumed.update == 4
    resumed.advance(6)
    assert resumed.done and whole.done
    for (name, a), b in zip(whole.agent.state_dict().items(), resumed.agent.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for key in whole.history:
        assert whole.history[key] == resumed.history[key], key
    assert ppo.Run.resume_or_new(small_config(seed=1), tmp_path / "ckpt").step == 0   # other settings: a new run


# ---------------------------------------------------------------------------------------
# The stored reference runs the chapter draws its tables and bands from


def evaluation_steps(cfg):
    """The steps at which Run.advance evaluates: every update that crosses a multiple of eval_every."""
    ends = [cfg.batch_size * (u + 1) for u in range(cfg.num_updates)]
    return [s for s in ends if s // cfg.eval_every > (s - cfg.batch_size) // cfg.eval_every]


def test_reference_runs_cover_every_variant_on_the_runs_own_grid():
    rows = ppo.read_reference_runs()
    for variant in ppo.VARIANTS:
        steps, curves = ppo.reference_curves(rows, variant)
        assert curves.shape[0] == 3, variant
        assert steps.tolist() == evaluation_steps(ppo.variant_config(variant, 0)), variant


def test_reference_ppo_meets_the_chapter_target():
    """The issue: all 3 seeds at 475 within 150,000 steps (aim 100,000); the chapter says they stay there."""
    steps, curves = ppo.reference_curves(ppo.read_reference_runs(), "ppo")
    for curve in curves:
        first, stable = ppo.steps_to_target(steps, curve, 475.0)
        assert first is not None and first <= 100_000 and stable is not None and stable <= 100_000


def test_steps_to_target_first_and_stable():
    assert ppo.steps_to_target([1, 2, 3, 4], [480, 400, 476, 500], 475) == (1, 3)
    assert ppo.steps_to_target([1, 2, 3], [480, 490, 3], 475) == (1, None)
    assert ppo.steps_to_target([1, 2], [1, 2], 475) == (None, None)
