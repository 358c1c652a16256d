"""Chapter 7 (work in progress): GAE and the clipped loss against plain definitions.

GAE against its definition as a sum of discounted TD errors cut at episode ends, and against the
λ = 1 (discounted return bootstrapped at the end) and λ = 0 (one-step TD error) identities, with
dones in the middle of the rollout; the clipped surrogate at ratios inside and outside [1 − ε, 1 + ε]
for positive and negative advantages.
"""

import math

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
    dones = torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    returns = ppo.monte_carlo_returns(rewards, dones, 0.5)
    torch.testing.assert_close(returns[:, 0], torch.tensor([1.5, 1.0, 1.5, 1.0]))   # the last episode is cut off
