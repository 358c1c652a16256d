"""Profile, device, seeds and the versions a reader pastes into a bug report.

Every chapter starts with ``rt = setup()``: it reads ``BOOK_PROFILE``, picks the device,
seeds every random number generator and prints what it chose.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
from dataclasses import dataclass

import numpy as np
import torch

PROFILES = ("smoke", "cpu", "gpu")

# Libraries whose versions matter for the book's results (distribution names).
KEY_LIBRARIES = (
    "torch",
    "numpy",
    "matplotlib",
    "scikit-learn",
    "transformers",
    "peft",
    "bitsandbytes",
    "gymnasium",
    "optuna",
)


def get_profile() -> str:
    """The profile from ``BOOK_PROFILE``; ``gpu`` when CUDA is present, else ``cpu``."""
    value = os.environ.get("BOOK_PROFILE", "").strip().lower()
    if not value:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if value not in PROFILES:
        raise ValueError(
            f"BOOK_PROFILE={value!r} は使えません。{', '.join(PROFILES)} のどれかを指定してください。"
        )
    return value


def get_device() -> torch.device:
    """CUDA when it is present, otherwise the CPU (the profile only decides sizes)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (the global generator that libraries and readers' code draw from)
    torch.manual_seed(seed)  # also seeds every CUDA device


def versions() -> dict[str, str]:
    """Python and the key libraries' versions ("未インストール" when absent)."""
    found = {"python": platform.python_version()}
    for name in KEY_LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "未インストール"
    return found


@dataclass(frozen=True)
class Runtime:
    profile: str
    device: torch.device
    seed: int

    def pick(self, **by_profile):
        """The value for this profile: ``rt.pick(smoke=200, cpu=2_000, gpu=10_000)``."""
        return pick(self.profile, **by_profile)

    @property
    def progress(self) -> bool:
        """Whether long loops show a progress bar: not in the smoke profile, and not while the book
        build executes the chapter (``BOOK_NO_PROGRESS=1``, set by ``tasks.py build``), where every
        update of a bar would become a line of the page."""
        return self.profile != "smoke" and not os.environ.get("BOOK_NO_PROGRESS")


def pick(profile: str, **by_profile):
    missing = [p for p in PROFILES if p not in by_profile]
    if missing:
        raise TypeError(f"プロファイル {missing} の値がありません")
    return by_profile[profile]


def setup(seed: int = 0, verbose: bool = True) -> Runtime:
    """Seed everything and report profile, device and versions in one call."""
    profile = get_profile()
    device = get_device()
    seed_everything(seed)
    if verbose:
        gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "なし"
        print(f"プロファイル: {profile}   デバイス: {device} (GPU: {gpu})   シード: {seed}")
        if profile == "gpu" and device.type != "cuda":
            print("注意: gpu プロファイルですが GPU が見つかりません。CPU では時間がかかります。")
        print("バージョン: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    return Runtime(profile=profile, device=device, seed=seed)
