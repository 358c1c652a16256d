"""Chapter 7: PPO solves CartPole-v1 on this CPU.

Measured on the 2-core machine (evaluation every 5,120 steps, one thread): seeds 0/1/2 first reach a
greedy 20-episode mean >= 475 at 15,360 / 5,120 / 5,120 steps and stay there from 51,200 / 40,960 /
25,600 steps, about 26–29 s per 150k-step run; the issue's target is 150,000 steps (aim 100,000).
This test trains seed 0 for 61,440 steps and asks for the target at some evaluation and at the last.
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
