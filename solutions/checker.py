"""The exercise checker.

Each exercise is registered once, with its reference answer and its tests::

    ex = register("scaled_dot_product_attention", "スケール化ドット積アテンション",
                  chapter="01_transformer", reference=scaled_dot_product_attention)

    @ex.test("ランダムな入力で模範解答と一致する")
    def _(answer, reference):
        ...  # raise CheckFailed("日本語の説明") when the answer is wrong

In a notebook, ``name = check("exercise_id", name)`` runs those tests on the reader's
object, prints a Japanese verdict and returns the reader's object when every test passes,
otherwise the reference (so the chapter goes on). With ``BOOK_STRICT=1`` a failing or
missing answer raises :class:`ExerciseError` instead. With ``BOOK_GRADE_LOG=<file>`` each
verdict is also appended to that file as one JSON line (used by ``python -m solutions.grade``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

PASS, FAIL, MISSING = "pass", "fail", "missing"
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


class CheckFailed(Exception):
    """Raised by an exercise test: the message (Japanese) says what is wrong and why."""


class ExerciseError(Exception):
    """Raised by :func:`check` in strict mode when an answer fails or is missing."""


@dataclass
class Exercise:
    id: str
    title: str
    chapter: str
    reference: object
    tests: list[tuple[str, Callable]] = field(default_factory=list)

    @property
    def expects_class(self) -> bool:
        return inspect.isclass(self.reference)

    def test(self, description: str):
        """Decorator: add ``fn(answer, reference)`` as a test with a Japanese description."""

        def add(fn):
            self.tests.append((description, fn))
            return fn

        return add

    def gpu_test(self, fn):
        """Decorator: ``fn(answer, reference, device)`` run on CUDA when a GPU is present (else it passes).

        Every exercise whose answer holds tensors should have one: a reader on Colab gets a
        verdict about ``.to(device)`` mistakes that the CPU tests cannot see.
        """

        def on_cuda(answer, reference):
            if torch.cuda.is_available():
                fn(answer, reference, torch.device("cuda"))

        self.tests.append(("GPU 上でも動く（GPU があるときだけ調べます）", on_cuda))
        return fn


_REGISTRY: dict[str, Exercise] = {}


def register(exercise_id: str, title: str, *, chapter: str, reference) -> Exercise:
    if exercise_id in _REGISTRY:
        raise ValueError(f"exercise id {exercise_id!r} is registered twice")
    ex = Exercise(exercise_id, title, chapter, reference)
    _REGISTRY[exercise_id] = ex
    return ex


def exercise_modules() -> list[str]:
    """The modules of ``solutions.exercises``, one per chapter, found on disk."""
    package = importlib.import_module("solutions.exercises")
    return sorted(f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__))


def _load_all() -> None:
    """Import every chapter's exercise module so that the registry is complete."""
    for name in exercise_modules():
        importlib.import_module(name)


def get_exercise(exercise_id: str) -> Exercise:
    _load_all()
    try:
        return _REGISTRY[exercise_id]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"演習 {exercise_id!r} はありません。登録されている演習: {known}") from None


def list_exercises(chapter: str | None = None) -> list[Exercise]:
    """Every registered exercise (optionally of one chapter), in registration order."""
    _load_all()
    return [ex for ex in _REGISTRY.values() if chapter is None or ex.chapter == chapter]


# ---------------------------------------------------------------------------------------
# Running the tests


@dataclass
class Verdict:
    exercise_id: str
    status: str  # PASS, FAIL or MISSING
    message: str
    tests_passed: int
    tests_total: int


def _where_in_readers_code(exc: BaseException) -> str:
    """'(行 12: q @ k.T)' for the innermost frame outside this package and the libraries."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        fname = frame.filename or ""
        if fname.startswith(_PACKAGE_DIR) or "site-packages" in fname or "/lib/python" in fname:
            continue
        code = (frame.line or "").strip()
        return f"（{frame.name} の {frame.lineno} 行目: {code}）" if code else ""
    return ""


def _raised_by_missing_forward(exc: BaseException) -> bool:
    """True when torch raised it because the module has no ``forward`` (e.g. ``def foward``)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].name == "_forward_unimplemented"


_REMOVED_NUMPY_ALIASES = ("int", "float", "object", "complex", "str")  # np.bool came back in NumPy 2.0


def _known_cause(exc: BaseException) -> str:
    """A Japanese hint for an exception whose cause is well known (empty when none is)."""
    text = str(exc)
    if isinstance(exc, AttributeError) and any(
            f"module 'numpy' has no attribute '{alias}'" in text for alias in _REMOVED_NUMPY_ALIASES):
        return ("（np.int や np.float などの別名は NumPy 1.24 で削除されました。組み込みの int や float、"
                "または np.int64 のように大きさのある型を使ってください）")
    return ""


def _run_tests(ex: Exercise, answer) -> Verdict:
    total = len(ex.tests)

    def verdict(status, message, passed=0):
        return Verdict(ex.id, status, message, passed, total)

    if answer is None:
        return verdict(MISSING, "None が渡されました。セルで定義した関数やクラスを渡してください。")
    if ex.expects_class:
        if not inspect.isclass(answer):
            return verdict(
                FAIL,
                f"クラスが必要ですが、{type(answer).__name__} 型の値が渡されました。"
                "インスタンスではなくクラスそのもの（例: MultiHeadAttention）を渡してください。",
            )
        if issubclass(ex.reference, torch.nn.Module) and not issubclass(answer, torch.nn.Module):
            return verdict(FAIL, "nn.Module を継承したクラスにしてください。")
    elif not callable(answer) or inspect.isclass(answer):
        return verdict(FAIL, f"関数が必要ですが、{type(answer).__name__} 型の値が渡されました。")

    for passed, (description, test) in enumerate(ex.tests):
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(1234 + passed)  # CPU only: CUDA streams untouched
                test(answer, ex.reference)
        except CheckFailed as e:
            return verdict(FAIL, f"「{description}」で不合格: {e}", passed)
        except NotImplementedError as e:
            if _raised_by_missing_forward(e):
                return verdict(FAIL, "forward メソッドが見つかりません。`def forward(self, ...)` の綴りと"
                                     "インデント（クラスの中にあるか）を確認してください。", passed)
            return verdict(MISSING, "まだ実装されていません（NotImplementedError が送出されました）。", passed)
        except Exception as e:  # an exception inside the reader's code
            where = _where_in_readers_code(e)
            return verdict(
                FAIL,
                f"「{description}」の実行中に、解答のコードで {type(e).__name__} が発生しました{where}: {e}"
                + _known_cause(e),
                passed,
            )
    return verdict(PASS, f"{total} 件のテストにすべて合格しました。", total)


def is_strict() -> bool:
    return os.environ.get("BOOK_STRICT", "").strip().lower() in ("1", "true", "yes")


def _log(verdict: Verdict) -> None:
    path = os.environ.get("BOOK_GRADE_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(verdict.__dict__, ensure_ascii=False) + "\n")


def evaluate(exercise_id: str, answer) -> Verdict:
    """Run the tests without printing or falling back: what :func:`check` decides on."""
    return _run_tests(get_exercise(exercise_id), answer)


def check(exercise_id: str, answer):
    """Check ``answer``; return it when it passes, else the reference (or raise when strict)."""
    ex = get_exercise(exercise_id)
    v = _run_tests(ex, answer)
    _log(v)
    head = f"演習「{ex.title}」({ex.id})"
    if v.status == PASS:
        print(f"✅ 正解です。{head}: {v.message}")
        return answer
    if is_strict():
        raise ExerciseError(f"{head}: {v.message}")
    mark = "⏭  未回答" if v.status == MISSING else "❌ 不正解"
    print(f"{mark}  {head}")
    print(f"   {v.message}")
    print(f"   → ここから先は模範解答を使って進みます。模範解答は show_solution({ex.id!r}) で表示できます。")
    return ex.reference


# ---------------------------------------------------------------------------------------
# Showing source


def _source_markdown(obj) -> str:
    return "```python\n" + inspect.getsource(obj).rstrip() + "\n```"


def show_source(obj) -> None:
    """Display the source of a function or class, highlighted (plain text outside IPython)."""
    text = _source_markdown(obj)
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display

        if get_ipython() is not None:
            display(Markdown(text))
            return
    except ImportError:
        pass
    print(text)


def show_solution(exercise_id: str) -> None:
    """Display the reference answer of an exercise."""
    ex = get_exercise(exercise_id)
    print(f"演習「{ex.title}」({ex.id}) の模範解答:")
    show_source(ex.reference)


# ---------------------------------------------------------------------------------------
# Helpers for writing tests: each raises CheckFailed with a Japanese explanation.


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"形状 {tuple(x.shape)}・dtype {x.dtype} のテンソル"
    return f"{type(x).__name__} 型の値"


def expect_tensor(x, name: str, shape=None, dtype=None, device=None) -> torch.Tensor:
    """``x`` must be a finite tensor of the given shape, dtype and device (type)."""
    if not isinstance(x, torch.Tensor):
        raise CheckFailed(f"{name} はテンソルのはずですが、{_describe(x)} が返りました。")
    if device is not None and x.device.type != torch.device(device).type:
        raise CheckFailed(f"{name} は {torch.device(device).type} 上にあるはずですが、{x.device} 上にあります。"
                          "入力と同じデバイス（device 引数があればそのデバイス）に作ってください。")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise CheckFailed(f"{name} の形状は {tuple(shape)} のはずですが、{tuple(x.shape)} でした。")
    if dtype is not None and x.dtype != dtype:
        raise CheckFailed(f"{name} の dtype は {dtype} のはずですが、{x.dtype} でした。")
    if x.is_floating_point() and not torch.isfinite(x).all():
        bad = "NaN" if torch.isnan(x).any() else "inf"
        raise CheckFailed(
            f"{name} に {bad} が含まれています。マスクした位置に入れる値や、0 による割り算を確認してください。"
        )
    return x


def expect_tuple(x, name: str, length: int) -> tuple:
    if not isinstance(x, (tuple, list)) or len(x) != length:
        raise CheckFailed(f"{name} は {length} 要素のタプルのはずですが、{_describe(x)} が返りました。")
    return tuple(x)


def expect_close(actual: torch.Tensor, expected: torch.Tensor, name: str, atol=1e-5, rtol=1e-4, hint=""):
    """``actual`` must equal ``expected`` up to the tolerance; the message shows where it differs."""
    expect_tensor(actual, name, shape=expected.shape, device=expected.device)
    actual_f = actual.detach().to(torch.float64)
    expected_f = expected.detach().to(torch.float64)
    diff = (actual_f - expected_f).abs()
    bad = diff > atol + rtol * expected_f.abs()
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        message = (
            f"{name} が模範解答と一致しません（最大絶対誤差 {diff.max().item():.3g}、"
            f"たとえば位置 {idx} で期待値 {expected_f[idx].item():.5g} に対して {actual_f[idx].item():.5g}）。"
        )
        raise CheckFailed(message + (" " + hint if hint else ""))


def copy_reference_parameters(theirs, ours, layout: str, noise: float = 0.1):
    """Move the reference module's parameters off their initial values (by ``noise``·N(0, 1), so
    that a skipped LayerNorm or bias shows in the outputs), then load them into the reader's module.

    ``layout`` names the submodules of the given ``__init__`` that must stay as they are.
    """
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(noise * torch.randn_like(p))
    try:
        theirs.load_state_dict(ours.state_dict())
    except RuntimeError as e:
        raise CheckFailed(f"__init__ の構成（{layout}）を変えないでください（パラメータを模範解答からコピーして"
                          f"比べます）: {str(e).splitlines()[0]}") from None


def call_answer(answer, *args, **kwargs):
    """Call the reader's code without letting it mutate its tensor arguments; its own errors become a
    verdict (CheckFailed), NotImplementedError (未回答) and CheckFailed pass through."""
    try:
        return call_without_mutation(answer, *args, **kwargs)
    except (CheckFailed, NotImplementedError):
        raise
    except Exception as e:
        raise CheckFailed(f"呼び出すと {type(e).__name__} になりました（{e}）。") from None


def call_without_mutation(fn, *args, **kwargs):
    """Call ``fn`` and fail when it changes any tensor it was given (in-place operations)."""
    tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    before = [t.detach().clone() for t in tensors]
    result = fn(*args, **kwargs)
    for i, (t, b) in enumerate(zip(tensors, before, strict=True)):
        if t.shape != b.shape or not torch.equal(t.detach(), b):
            raise CheckFailed(
                f"{i + 1} 番目の入力テンソルが書き換えられています。"
                "`div_` や `masked_fill_` などの in-place 操作（末尾が _ のメソッド）を使わず、"
                "新しいテンソルを作ってください。"
            )
    return result
