"""Grade a saved chapter notebook in strict mode.

    python -m solutions.grade book/01_transformer.ipynb [--profile smoke] [--timeout 600]
    python -m solutions.grade --list      # every registered exercise

The notebook is executed with ``BOOK_STRICT=1`` (a failing or missing answer raises in its
cell and execution goes on with the next cell) and ``BOOK_GRADE_LOG`` (every ``check``
writes its verdict). Prints one row per exercise; exits with 1 when any exercise of the
chapter did not pass, 2 when the notebook cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .checker import FAIL, MISSING, PASS, list_exercises

LABELS = {PASS: "合格", FAIL: "不合格", MISSING: "未回答", "not_run": "未実行"}


def grade(path: Path, profile: str = "smoke", timeout: int = 600,
          errors: list[str] | None = None) -> tuple[list[dict], bool]:
    """Rows (one per exercise of the chapter) and whether all passed. ``errors``, when given, receives one
    line per code cell that raised something other than a failed check (those are in the rows)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "verdicts.jsonl"
        env_backup = dict(os.environ)
        os.environ.update(BOOK_STRICT="1", BOOK_GRADE_LOG=str(log), BOOK_PROFILE=profile)
        try:
            NotebookClient(nb, timeout=timeout, allow_errors=True, kernel_name="python3",
                           resources={"metadata": {"path": str(path.parent.resolve())}}).execute()
        finally:
            os.environ.clear()
            os.environ.update(env_backup)
        seen = {}
        if log.exists():
            for line in log.read_text(encoding="utf-8").splitlines():
                v = json.loads(line)
                seen[v["exercise_id"]] = v  # the last check of an exercise counts
    if errors is not None:
        code_cells = [c for c in nb.cells if c.cell_type == "code"]
        for number, cell in enumerate(code_cells, 1):
            for out in cell.get("outputs", []):
                if out.get("output_type") == "error" and out.get("ename") != "ExerciseError":
                    errors.append(f"{number} 番目のコードセル: {out.get('ename')}: {out.get('evalue')}")
    expected = [ex.id for ex in list_exercises(chapter=path.stem)]
    rows = [seen.get(i, {"exercise_id": i, "status": "not_run", "message": "check(...) が実行されませんでした。"})
            for i in expected]
    rows += [v for i, v in seen.items() if i not in expected]
    return rows, all(r["status"] == PASS for r in rows) and bool(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="章のノートブックを厳格モードで採点します。")
    parser.add_argument("notebook", type=Path, nargs="?")
    parser.add_argument("--list", action="store_true", help="登録されている演習の一覧を表示します")
    parser.add_argument("--profile", default="smoke", choices=["smoke", "cpu", "gpu"])
    parser.add_argument("--timeout", type=int, default=600, help="セルごとの制限時間（秒）")
    args = parser.parse_args(argv)
    if args.list:
        for ex in list_exercises():
            print(f"{ex.chapter:<16} {ex.id:<32} {ex.title}")
        return 0
    if args.notebook is None:
        parser.error("ノートブックを指定してください（一覧は --list）")
    if not args.notebook.is_file():
        print(f"ノートブックが見つかりません: {args.notebook}", file=sys.stderr)
        return 2
    errors: list[str] = []
    rows, ok = grade(args.notebook, args.profile, args.timeout, errors)
    width = max([len(r["exercise_id"]) for r in rows] + [8])
    print(f"採点結果: {args.notebook}")
    print(f"{'演習':<{width}}  結果    詳細")
    for r in rows:
        print(f"{r['exercise_id']:<{width}}  {LABELS[r['status']]:<6}  {r['message']}")
    passed = sum(r["status"] == PASS for r in rows)
    print(f"合計: {passed} / {len(rows)} 合格")
    if errors:  # not part of the verdict, but the reader should see them
        print("演習の判定のほかにエラーになったセル:")
        for line in errors:
            print(f"  {line}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
