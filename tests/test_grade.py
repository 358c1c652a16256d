"""`python -m solutions.grade` runs a saved notebook in strict mode and tables the verdicts."""

import inspect
import subprocess
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

from solutions import list_exercises

ROOT = Path(__file__).resolve().parents[1]


def write_notebook(path, sources):
    nb = new_notebook(cells=[new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def grade(path):
    return subprocess.run([sys.executable, "-m", "solutions.grade", str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_all_reference_answers_pass(tmp_path):
    cells = [("import math\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"
             "from solutions import check\nfrom solutions.transformer import FeedForward")]
    for ex in list_exercises(chapter="01_transformer"):
        name = ex.reference.__name__
        cells.append(inspect.getsource(ex.reference) + f"\n{name} = check({ex.id!r}, {name})")
    path = tmp_path / "01_transformer.ipynb"
    write_notebook(path, cells)
    result = grade(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "合計: 5 / 5 合格" in result.stdout


def test_wrong_missing_and_unrun_exercises_fail(tmp_path):
    path = tmp_path / "01_transformer.ipynb"
    write_notebook(path, [
        "import torch\nfrom solutions import check",
        ("def causal_mask(T, device=None):\n    return torch.ones(T, T, dtype=torch.bool).triu()\n"
        "causal_mask = check('causal_mask', causal_mask)"),
        ("def scaled_dot_product_attention(q, k, v, mask=None):\n    raise NotImplementedError\n"
        "scaled_dot_product_attention = check('scaled_dot_product_attention', scaled_dot_product_attention)"),
        "print('execution goes on after a failing check')",
    ])
    result = grade(path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "不合格" in lines["causal_mask"] and "上三角" in lines["causal_mask"]
    assert "未回答" in lines["scaled_dot_product_attention"]
    assert "未実行" in lines["multi_head_attention"]
    assert "合計: 0 / 5 合格" in result.stdout


def test_missing_notebook_exit_code(tmp_path):
    assert grade(tmp_path / "nope.ipynb").returncode == 2


def test_list_prints_every_exercise():
    result = subprocess.run([sys.executable, "-m", "solutions.grade", "--list"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0
    for ex in list_exercises():
        assert ex.id in result.stdout and ex.title in result.stdout
