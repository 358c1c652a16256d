"""Chapter 7 (work in progress): PPO solves CartPole-v1 on this CPU.

Measured on the 2-core machine (evaluation every 10,240 steps): seeds 0–4 first reach a greedy
20-episode mean >= 475 at 20,480 / 10,240 / 30,720 / 10,240 / 20,480 steps, about 17 s per
150k-step run; the issue's target is 150,000 steps.
"""

import pytest
import torch

from solutions import ppo

pytest.importorskip("gymnasium")


def test_ppo_reaches_475_on_cartpole():
    torch.set_num_threads(1)
    history = ppo.train(ppo.Config(seed=0, total_steps=61_440))
    assert history["steps_to_target"] is not None, history["eval_return"]
    assert history["eval_return"][-1] >= 475
