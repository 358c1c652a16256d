"""The checker's contract: verdicts, fallbacks, strict mode, bad input, the grade log."""

import json

import pytest
import torch

from solutions import check, list_exercises, show_solution
from solutions import transformer as tr
from solutions.checker import ExerciseError, evaluate


def good_mask(T, device=None):
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def test_pass_returns_the_readers_object(capsys):
    assert check("causal_mask", good_mask) is good_mask
    assert "✅ 正解です" in capsys.readouterr().out


@pytest.mark.parametrize("answer,phrase", [
    (None, "None が渡されました"),
    (42, "関数が必要ですが、int"),
    (tr.MultiHeadAttention, "関数が必要ですが"),
    (lambda T, device=None: 1 / 0, "ZeroDivisionError"),
    (lambda T, device=None: torch.full((T, T), float("nan")), "dtype"),
    (lambda T, device=None: torch.ones(T + 1, T, dtype=torch.bool).tril(), "形状"),
    (lambda T, device=None: [[True]], "テンソルのはず"),
])
def test_bad_input_falls_back_to_the_reference_with_a_japanese_message(answer, phrase, capsys):
    result = check("causal_mask", answer)
    out = capsys.readouterr().out
    assert result is tr.causal_mask
    assert phrase in out
    assert "模範解答を使って進みます" in out
    assert "Traceback" not in out


def test_class_exercise_rejects_functions_and_instances():
    assert "クラスが必要" in evaluate("multi_head_attention", tr.scaled_dot_product_attention).message
    assert "インスタンスではなく" in evaluate("multi_head_attention", tr.MultiHeadAttention(16, 4)).message
    assert "nn.Module" in evaluate("multi_head_attention", dict).message


def test_exception_message_points_at_the_readers_line():
    def broken(q, k, v, mask=None):
        scores = q @ k  # wrong: k is not transposed
        return scores, scores

    v = evaluate("scaled_dot_product_attention", broken)
    assert v.status == "fail"
    assert "RuntimeError" in v.message and "scores = q @ k" in v.message


def test_nan_output_is_named():
    def nan_attention(q, k, v, mask=None):
        out, w = tr.scaled_dot_product_attention(q, k, v, mask)
        return out / 0 * 0, w

    assert "NaN" in evaluate("scaled_dot_product_attention", nan_attention).message


def test_missing_answer_is_reported_as_missing(capsys):
    def skeleton(T, device=None):
        raise NotImplementedError

    assert check("causal_mask", skeleton) is tr.causal_mask
    assert "未回答" in capsys.readouterr().out


def test_strict_mode_raises_for_wrong_and_missing(monkeypatch):
    monkeypatch.setenv("BOOK_STRICT", "1")
    with pytest.raises(ExerciseError, match="上三角"):
        check("causal_mask", lambda T, device=None: torch.ones(T, T, dtype=torch.bool).triu())

    def skeleton(T, device=None):
        raise NotImplementedError

    with pytest.raises(ExerciseError, match="実装されていません"):
        check("causal_mask", skeleton)
    assert check("causal_mask", good_mask) is good_mask


def test_checking_does_not_disturb_the_readers_random_stream():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check("scaled_dot_product_attention", tr.scaled_dot_product_attention)
    assert torch.equal(torch.rand(3), expected)


def test_grade_log_records_every_verdict(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("BOOK_GRADE_LOG", str(log))
    check("causal_mask", good_mask)
    check("causal_mask", None)
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert [r["status"] for r in rows] == ["pass", "missing"]


def test_unknown_exercise_lists_the_known_ones():
    with pytest.raises(KeyError, match="causal_mask"):
        check("no_such_exercise", good_mask)


def test_show_solution_prints_the_reference_source(capsys):
    show_solution("scaled_dot_product_attention")
    out = capsys.readouterr().out
    assert "def scaled_dot_product_attention(q, k, v, mask=None):" in out
    assert "```python" in out


def test_list_exercises_in_chapter_order():
    assert [ex.id for ex in list_exercises(chapter="01_transformer")] == [
        "scaled_dot_product_attention", "causal_mask", "sinusoidal_positional_encoding",
        "multi_head_attention", "transformer_block"]


def test_misspelled_forward_is_a_failure_not_a_missing_answer():
    class Misspelled(torch.nn.Module):
        def __init__(self, d_model, n_heads, dropout=0.0):
            super().__init__()
            self.W_q, self.W_k, self.W_v, self.W_o = (torch.nn.Linear(d_model, d_model) for _ in range(4))

        def foward(self, query, key, value, mask=None):
            return tr.MultiHeadAttention.forward(self, query, key, value, mask)

    v = evaluate("multi_head_attention", Misspelled)
    assert v.status == "fail" and "forward メソッドが見つかりません" in v.message


def test_answer_on_the_wrong_device_is_named():
    v = evaluate("causal_mask", lambda T, device=None: torch.ones(T, T, dtype=torch.bool, device="meta").tril())
    assert v.status == "fail" and "meta 上にあります" in v.message


def test_gpu_tests_run_only_with_cuda(monkeypatch):
    from solutions.checker import Exercise

    ex = Exercise("x", "x", "01_transformer", reference=good_mask)
    seen = []
    ex.gpu_test(lambda answer, reference, device: seen.append(device))
    (description, run), = ex.tests
    assert "GPU" in description
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run(good_mask, good_mask)
    assert seen == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    run(good_mask, good_mask)
    assert seen == [torch.device("cuda")]
