"""The shared instruments measure what they claim (checked against known quantities)."""

import time

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn as nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from solutions import instruments as ins


def test_time_ms_measures_a_known_sleep_and_warms_up_first():
    calls = []

    def fn():
        calls.append(time.perf_counter())
        time.sleep(0.02)

    ms = ins.time_ms(fn, "cpu", repeats=3, warmup=2)
    assert len(calls) == 5
    assert 19 <= ms < 60, ms
    with pytest.raises(ValueError, match="repeats"):
        ins.time_ms(fn, "cpu", repeats=0)


def test_peak_memory_counts_a_temporary_allocation_on_the_cpu():
    def fn():
        a = torch.ones(1024, 1024)  # 4 MiB, freed before the 8 MiB one
        del a
        b = torch.ones(2048, 1024)
        return b.sum()

    peak = ins.peak_memory_mib(fn, "cpu")
    assert 7.9 < peak < 12.5, peak  # the larger tensor (8 MiB) plus small temporaries, not 4 + 8


def test_record_outputs_keeps_the_last_call_and_removes_its_hooks():
    lin = nn.Linear(3, 2)
    with ins.record_outputs({"lin": lin}) as out:
        lin(torch.zeros(1, 3))
        y = lin(torch.ones(1, 3))
    assert torch.equal(out["lin"], y.detach()) and not out["lin"].requires_grad
    assert not lin._forward_hooks
    with pytest.raises(RuntimeError), ins.record_outputs({"lin": lin}):
        raise RuntimeError
    assert not lin._forward_hooks


def test_activation_stats_against_numpy():
    # activation_stats computes in float32: compare at float32 precision (an absolute term, since a mean near
    # 0 has no meaningful relative error; unseeded and at pytest's default tolerance this test failed once here)
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = ins.activation_stats(x)
    a = x.numpy()
    close = {"rel": 1e-6, "abs": 1e-6}
    assert s["mean"] == pytest.approx(a.mean(), **close)
    assert s["std"] == pytest.approx(a.std(ddof=1), **close)
    assert s["rms"] == pytest.approx(np.sqrt((a**2).mean()), **close)
    assert s["max_abs"] == pytest.approx(np.abs(a).max(), **close)
    assert s["mean"] != pytest.approx(a.mean() + 1e-3, **close)      # the tolerance still tells values apart


def test_gradient_norms_by_parameter_and_by_block():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    model.blocks[1](model.blocks[0](torch.ones(1, 2))).sum().backward()
    per_param = ins.gradient_norms(model)
    assert set(per_param) == {"blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias"}
    expected = [float(torch.cat([p.grad.flatten() for p in b.parameters()]).norm()) for b in model.blocks]
    assert ins.block_gradient_norms(model) == pytest.approx(expected)
    assert ins.block_gradient_norms(list(model.blocks)) == pytest.approx(expected)


def test_mean_and_spread_over_seeds():
    assert ins.mean_and_spread([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert ins.mean_and_spread([5.0]) == (5.0, 0.0)
    assert ins.format_mean_spread([0.9, 0.92, 0.94]) == "0.920 ± 0.020 (n=3)"
    assert ins.format_mean_spread([90, 92, 94], ".1f", unit=" %") == "92.0 ± 2.0 % (n=3)"
    with pytest.raises(ValueError, match="値がありません"):
        ins.mean_and_spread([])


def test_smooth_is_a_trailing_mean():
    y = [1.0, 3.0, 5.0, 7.0]
    assert ins.smooth(y, 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert ins.smooth(y, 1).tolist() == y


def test_plot_curve_draws_mean_band_and_reference():
    fig, ax = plt.subplots()
    runs = [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]
    mean = ins.plot_curve(ax, [0, 1, 2], runs, "学習", reference=2.5, reference_label="基準")
    assert mean.tolist() == [2.0, 3.0, 4.0]
    assert len(ax.collections) == 1  # the min-max band over the two seeds
    assert [line.get_label() for line in ax.lines] == ["学習", "基準"]
    ins.plot_curve(ax, [0, 1, 2], [1.0, 1.0, 1.0], "一つ", reference=(0.5, 1.5))
    assert len(ax.patches) == 1  # the reference band
    with pytest.raises(ValueError, match="長さ"):
        ins.plot_curve(ax, [0, 1], runs)
    plt.close(fig)


def test_evaluate_classifier_matches_a_direct_computation_and_restores_the_mode():
    from solutions.instruments import evaluate_classifier

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)).train()
    x, y = torch.randn(50, 4), torch.randint(3, (50,))
    got = evaluate_classifier(model, x, y, batch_size=7)  # batches that do not divide the data
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert abs(got["loss"] - torch.nn.functional.cross_entropy(logits, y).item()) < 1e-5
    assert got["accuracy"] == (logits.argmax(-1) == y).sum().item() / len(y)


def test_evaluate_policy_runs_the_episodes_side_by_side_as_one_at_a_time_would():
    """The batched evaluation gives each episode exactly the return of playing it alone with the same seed."""
    gym = pytest.importorskip("gymnasium")

    def lean(obs):                                    # a fixed policy: push towards the side the pole falls
        return (obs[..., 2] > 0).astype(np.int64)

    alone = []
    for e in range(6):
        env = gym.make("CartPole-v1")
        obs, _ = env.reset(seed=100 + e)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(int(lean(obs)))
            total += reward
            done = terminated or truncated
        alone.append(total)
    assert len(set(alone)) > 1                        # episodes of different lengths leave the batch at different times
    assert ins.evaluate_policy(lean, "CartPole-v1", 6, seed=100) == pytest.approx(np.mean(alone), abs=0)
