"""Chapter 6: the parts of the Rainbow agent against plain loops and hand-made cases.

The sum tree against priorities (sampling frequencies, a fixed seed and a stated tolerance), the
C51 projection against a loop over atoms, the noisy layer's factorised noise, and n-step returns
on a hand-made episode that ends once by truncation and once by termination.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

from solutions import rainbow
from solutions.exercises.rainbow import _projection_by_loop as projection_by_loop  # the checker's loop over atoms


@pytest.mark.parametrize("capacity", [1, 5, 8, 13, 1000])
def test_sum_tree_total_and_find_match_prefix_sums(capacity):
    rng = np.random.default_rng(capacity)
    tree = rainbow.SumTree(capacity)
    priorities = rng.uniform(0.1, 2.0, capacity)
    for i, p in enumerate(priorities):
        tree.update(i, p)
    tree.update(capacity // 2, 0.7)                       # overwrite one leaf: the sums must follow
    priorities[capacity // 2] = 0.7
    assert tree.total() == pytest.approx(priorities.sum())
    prefix = np.concatenate([[0.0], np.cumsum(priorities)])
    for value in rng.uniform(0, priorities.sum(), 200):
        expected = int(np.searchsorted(prefix, value, side="right") - 1)
        assert tree.find(value) == expected
    values = rng.uniform(0, priorities.sum(), 64)
    assert list(tree.find_batch(values)) == [tree.find(v) for v in values]
    assert tree.find(0.0) == 0
    assert tree.find(np.nextafter(tree.total(), 0)) == capacity - 1


def test_find_batch_equals_find_at_boundaries_zero_leaves_and_a_partly_filled_tree():
    tree = rainbow.SumTree(1000)                          # a buffer with 7 of 1000 places filled
    priorities = [1.0, 0.0, 3.0, 0.5, 5.5, 0.0, 2.0]
    for i, p in enumerate(priorities):
        tree.update(i, p ** 0.5)
    prefix = np.cumsum([0.0] + [p ** 0.5 for p in priorities])
    values = np.concatenate([prefix[:-1], [np.nextafter(tree.total(), 0)],
                             np.random.default_rng(0).uniform(0, tree.total(), 500)])
    assert list(tree.find_batch(values)) == [tree.find(v) for v in values]
    assert set(tree.find_batch(values)) <= {0, 2, 3, 4, 6}


@pytest.mark.parametrize("capacity", [1, 2, 7, 1000])
def test_update_batch_leaves_the_same_tree_as_update_in_a_loop(capacity):
    """Exactly the same floats, repeated indices included (the last priority of an index counts)."""
    rng = np.random.default_rng(capacity)
    looped, batched = rainbow.SumTree(capacity), rainbow.SumTree(capacity)
    for i, p in enumerate(rng.uniform(0.1, 2.0, capacity)):
        looped.update(i, p)
        batched.update(i, p)
    for _ in range(5):
        indices = rng.integers(0, capacity, 64)             # a batch: with repeats
        priorities = rng.uniform(0.0, 3.0, 64)
        for i, p in zip(indices, priorities, strict=True):
            looped.update(int(i), float(p))
        batched.update_batch(indices, priorities)
        assert np.array_equal(looped.tree, batched.tree)


def test_greedy_actions_of_a_batch_are_the_greedy_acts_one_by_one():
    """rainbow.evaluate plays its episodes as one batch: the same actions as act(..., greedy=True), and both
    are the argmax of the mean weights' Q-values, computed here apart from the eval branch (a copy of the
    network in training mode with every noise sample set to zero, one observation at a time)."""
    import copy

    agent = rainbow.Agent(4, 2, rainbow.Config(seed=3))
    obs = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    batched = list(agent.greedy_actions(obs))
    assert batched == [agent.act(o, 0, greedy=True) for o in obs]
    assert agent.online.training                         # back in training mode (noise on) afterwards
    mean_net = copy.deepcopy(agent.online).train()
    for layer in mean_net.modules():
        if isinstance(layer, rainbow.NoisyLinear):
            layer.weight_epsilon.zero_()
            layer.bias_epsilon.zero_()
    with torch.no_grad():
        expected = [int(mean_net.q_values(torch.as_tensor(o)[None]).argmax(1)) for o in obs]
    assert batched == expected and len(set(expected)) == 2   # both actions occur: not a constant policy


def test_sum_tree_sampling_frequencies_follow_priorities():
    rng = np.random.default_rng(0)
    priorities = np.array([1.0, 0.0, 3.0, 0.5, 5.5, 0.0, 2.0])
    tree = rainbow.SumTree(len(priorities))
    for i, p in enumerate(priorities):
        tree.update(i, p)
    n = 200_000
    counts = np.bincount([tree.find(v) for v in rng.uniform(0, tree.total(), n)], minlength=len(priorities))
    expected = priorities / priorities.sum()
    assert counts[priorities == 0].sum() == 0
    # each frequency within 4 standard errors of its probability
    assert np.all(np.abs(counts / n - expected) <= 4 * np.sqrt(expected * (1 - expected) / n) + 1e-12)


def test_projection_equals_a_loop_and_conserves_mass():
    g = torch.Generator().manual_seed(0)
    support = torch.linspace(-10, 10, 21, dtype=torch.float64)
    next_probs = torch.rand(6, 21, generator=g, dtype=torch.float64).softmax(-1)
    rewards = torch.tensor([0.0, 1.0, -3.0, 25.0, 0.5, 1.0], dtype=torch.float64)   # 25 clips to v_max
    dones = torch.tensor([False, True, False, False, False, True])
    for gamma in (0.9, 1.0, 0.99 ** 3):                      # 1.0 puts every target exactly on an atom
        ours = rainbow.project_distribution(next_probs, rewards, dones, support, gamma)
        torch.testing.assert_close(ours, projection_by_loop(next_probs, rewards, dones, support, gamma))
        torch.testing.assert_close(ours.sum(-1), torch.ones(6, dtype=torch.float64))
    done_row = rainbow.project_distribution(next_probs, rewards, dones, support, 0.9)[1]
    assert done_row[11].item() == pytest.approx(1.0)          # all mass on the terminal reward 1.0


def test_noisy_linear_noise_is_factorised_and_absent_in_eval():
    torch.manual_seed(0)
    layer = rainbow.NoisyLinear(8, 5, std_init=0.5)
    assert torch.linalg.matrix_rank(layer.weight_epsilon).item() == 1
    torch.testing.assert_close(layer.weight_sigma, torch.full((5, 8), 0.5 / math.sqrt(8)))
    torch.testing.assert_close(layer.bias_sigma, torch.full((5,), 0.5 / math.sqrt(8)))
    x = torch.randn(3, 8)
    layer.eval()
    torch.testing.assert_close(layer(x), x @ layer.weight_mu.T + layer.bias_mu)
    layer.train()
    before = layer(x)
    layer.reset_noise()
    assert not torch.allclose(before, layer(x))


def test_n_step_returns_flush_with_truncation_bootstrapping_and_termination_not():
    acc = rainbow.NStepAccumulator(n=3, gamma=0.5)
    out = []
    for t in range(4):                                        # episode 1: truncated after 4 steps
        out += acc.push(f"s{t}", t, 1.0, f"s{t + 1}", terminated=False, truncated=t == 3)
    assert [(o[0], o[2], o[3], o[4], o[5]) for o in out] == [
        ("s0", 1.75, "s3", False, 0.125), ("s1", 1.75, "s4", False, 0.125),
        ("s2", 1.5, "s4", False, 0.25), ("s3", 1.0, "s4", False, 0.5)]
    out = []
    for t in range(2):                                        # episode 2: terminated after 2 steps
        out += acc.push(f"u{t}", t, 2.0, f"u{t + 1}", terminated=t == 1, truncated=False)
    assert [(o[0], o[2], o[3], o[4]) for o in out] == [("u0", 3.0, "u2", True), ("u1", 2.0, "u2", True)]


def test_checkpoint_and_resume_continue_the_same_run(tmp_path):
    cfg = rainbow.Config(hidden=32, buffer_size=1500, learning_starts=200, batch_size=16, target_update=100,
                         eval_every=10**9, n_atoms=11, seed=3)
    straight = rainbow.Run(cfg)
    straight.advance(900)                                     # crosses episode ends and a target update

    first = rainbow.Run(cfg)
    first.advance(450)
    first.save(tmp_path)
    resumed = rainbow.Run.load(tmp_path)
    assert (tmp_path / "run.json").exists() and not list(tmp_path.glob("*.pkl"))
    resumed.advance(450)

    assert resumed.step == straight.step == 900
    assert resumed.history["loss"] == straight.history["loss"]
    assert resumed.history["episode_return"] == straight.history["episode_return"]
    for (k, a), b in zip(straight.agent.online.state_dict().items(), resumed.agent.online.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    assert [straight.agent.act(straight.obs, 0, greedy=True)] == [resumed.agent.act(resumed.obs, 0, greedy=True)]


def test_resume_or_new_only_resumes_the_same_settings(tmp_path):
    cfg = rainbow.Config(hidden=32, buffer_size=500, learning_starts=100, batch_size=16, eval_every=10**9,
                         n_atoms=11, seed=1)
    run = rainbow.Run(cfg)
    run.advance(150)
    run.save(tmp_path)
    assert rainbow.Run.resume_or_new(cfg, tmp_path).step == 150
    assert rainbow.Run.resume_or_new(dataclasses.replace(cfg, lr=3e-4), tmp_path).step == 0
    assert rainbow.Run.resume_or_new(cfg, tmp_path / "missing").step == 0


def test_stored_reference_runs_cover_every_variant_and_seed():
    rows = rainbow.read_reference_runs()
    assert {r["variant"] for r in rows} == set(rainbow.VARIANTS)
    default = rainbow.Config()
    steps = list(range(default.eval_every, default.total_steps + 1, default.eval_every))
    for variant in rainbow.VARIANTS:
        for seed in (0, 1, 2):
            mine = [r for r in rows if r["variant"] == variant and r["seed"] == seed]
            assert [r["step"] for r in mine] == steps, (variant, seed)
            assert all(0 < r["eval_return"] <= 500 for r in mine)
