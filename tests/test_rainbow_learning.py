"""Chapter 6: the full Rainbow agent solves CartPole-v1 on this CPU.

Target of the issue: a greedy evaluation return >= 475 (mean of 20 episodes) within 50,000
environment steps. Measured on the 2-core machine: seeds 0, 1, 2 reach it at 20,000, 15,000 and
20,000 steps (about 100 s each); this test runs seed 0 for at most 30,000 steps.
"""

import pytest

from solutions import rainbow

pytest.importorskip("gymnasium")


def test_rainbow_reaches_475_on_cartpole():
    cfg = rainbow.Config(seed=0, total_steps=30_000)
    run = rainbow.Run(cfg)
    while run.step < cfg.total_steps and run.history["steps_to_target"] is None:
        run.advance(cfg.eval_every)
    assert run.history["steps_to_target"] is not None, run.history["eval_return"]
    assert run.history["eval_return"][-1] >= 475
