"""Every exercise of every chapter: the reference and other correct answers pass; known-wrong
answers fail with a verdict that names the mistake.

The cases of chapter ``NN_topic`` are ``CORRECT`` and ``WRONG`` in ``tests/answers/NN_topic.py``;
a chapter listed in _toc.yml without them, or with fewer than the chapter standard asks
(three wrong answers and one different-but-correct answer per exercise), fails here.
"""

import pytest

from chapters import CHAPTERS, answers_path, load_answers
from solutions import list_exercises
from solutions.checker import FAIL, PASS, evaluate

ANSWERS = {chapter: load_answers(chapter) for chapter in CHAPTERS}


def cases(kind):
    return [(chapter, exercise, case) for chapter, module in ANSWERS.items() if module is not None
            for exercise, items in getattr(module, kind, {}).items() for case in items]


def case_id(value):
    if isinstance(value, tuple):
        value = value[0]
    return getattr(value, "__name__", str(value))


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_exercise_has_correct_and_wrong_answers(chapter):
    module = ANSWERS[chapter]
    assert module is not None, f"{answers_path(chapter)} がありません（CORRECT と WRONG を定義してください）"
    registered = {ex.id for ex in list_exercises(chapter=chapter)}
    assert set(module.CORRECT) == registered == set(module.WRONG)
    for exercise in registered:
        assert len(module.CORRECT[exercise]) >= 1, exercise
        assert len(module.WRONG[exercise]) >= 3, exercise


@pytest.mark.parametrize("chapter,exercise", [(ex.chapter, ex.id) for ex in list_exercises()])
def test_reference_passes(chapter, exercise):
    ex = next(e for e in list_exercises(chapter=chapter) if e.id == exercise)
    v = evaluate(exercise, ex.reference)
    assert v.status == PASS, v.message
    assert v.tests_passed == v.tests_total >= 2


@pytest.mark.parametrize("chapter,exercise,answer", cases("CORRECT"), ids=case_id)
def test_other_correct_answers_pass(chapter, exercise, answer):
    v = evaluate(exercise, answer)
    assert v.status == PASS, v.message


@pytest.mark.parametrize("chapter,exercise,case", cases("WRONG"), ids=case_id)
def test_wrong_answers_fail_with_a_reason(chapter, exercise, case):
    answer, phrase = case
    v = evaluate(exercise, answer)
    assert v.status == FAIL, f"{answer.__name__} was accepted"
    assert phrase in v.message, v.message
