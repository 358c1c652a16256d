"""Profiles, seeding and the Japanese plotting set-up."""

import warnings

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import solutions  # noqa: F401  (sets the Japanese font)
from solutions import runtime


@pytest.mark.parametrize("value,expected", [("smoke", "smoke"), ("CPU", "cpu"), (" gpu ", "gpu")])
def test_profile_from_environment(monkeypatch, value, expected):
    monkeypatch.setenv("BOOK_PROFILE", value)
    assert runtime.get_profile() == expected


def test_default_profile_follows_cuda(monkeypatch):
    monkeypatch.delenv("BOOK_PROFILE", raising=False)
    assert runtime.get_profile() == ("gpu" if torch.cuda.is_available() else "cpu")


def test_unknown_profile_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("BOOK_PROFILE", "fast")
    with pytest.raises(ValueError, match="smoke, cpu, gpu"):
        runtime.get_profile()


def test_setup_seeds_and_reports(monkeypatch, capsys):
    monkeypatch.setenv("BOOK_PROFILE", "cpu")
    rt = runtime.setup(seed=3)
    a = torch.rand(2)
    runtime.setup(seed=3)
    assert torch.equal(a, torch.rand(2))
    out = capsys.readouterr().out
    assert "プロファイル: cpu" in out and "torch 2." in out and "optuna" in out
    assert rt.pick(smoke=1, cpu=2, gpu=3) == 2
    with pytest.raises(TypeError):
        rt.pick(smoke=1, cpu=2)


def test_japanese_labels_render_without_missing_glyphs():
    fig, ax = plt.subplots()
    ax.set_title("学習曲線とアテンションの重み")
    ax.set_xlabel("ステップ")
    ax.plot([0, -1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.canvas.draw()
    plt.close(fig)
    assert "IPAexGothic" in matplotlib.rcParams["font.family"] + matplotlib.rcParams["font.sans-serif"]


def test_progress_bars_only_outside_smoke_and_the_book_build(monkeypatch):
    monkeypatch.delenv("BOOK_NO_PROGRESS", raising=False)
    assert runtime.Runtime("cpu", torch.device("cpu"), 0).progress
    assert not runtime.Runtime("smoke", torch.device("cpu"), 0).progress
    monkeypatch.setenv("BOOK_NO_PROGRESS", "1")
    assert not runtime.Runtime("gpu", torch.device("cpu"), 0).progress
