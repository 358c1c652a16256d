"""「高度な機械学習エンジニアリング」の模範解答・チェッカー・共通ヘルパー。

    from solutions import setup, check, show_solution
"""

from . import plotting  # noqa: F401  (Japanese fonts for every plot)
from .checker import check, evaluate, list_exercises, show_solution, show_source
from .runtime import Runtime, get_device, get_profile, seed_everything, setup, versions

__all__ = [
    "Runtime",
    "check",
    "evaluate",
    "get_device",
    "get_profile",
    "list_exercises",
    "seed_everything",
    "setup",
    "show_solution",
    "show_source",
    "versions",
]
