"""The official VQA evaluation file itself, run on the case set of tests/vqa_cases.py, against
evals/metrics/vqa.py question by question.

The file is GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py (BSD 2-Clause,
Aishwarya Agrawal), read from outside the repository: $CM3EVAL_VQA_EVAL, else
../shared/data/vqa-official/vqaEval.py (the current file, a013f0043c1e) and
vqaEval-a4f1afd.py (the 2017 one) beside it. It is Python 2; the one mechanical conversion
applied (recorded in `to_python3`) turns its `print "..."` statements into calls; nothing else
changes. Its VQA / result objects are stood in by the two attributes `evaluate` reads (`qa` by
question id, `getQuesIds()`), built as the official vqaTools/vqa.py builds them.
"""

from __future__ import annotations

import copy
import os
import re
import types
from pathlib import Path

import pytest

from evals.metrics.vqa import vqa_accuracy
from real_data import SHARED
from vqa_cases import make_cases

OFFICIAL = {"current": "vqaEval.py", "legacy-2017": "vqaEval-a4f1afd.py"}


def official_file(evaluation: str) -> Path:
    env = os.environ.get("CM3EVAL_VQA_EVAL")
    base = Path(env).parent if env else SHARED / "vqa-official"
    path = Path(env) if env and evaluation == "current" else base / OFFICIAL[evaluation]
    if not path.is_file():
        pytest.skip(f"needs the official {OFFICIAL[evaluation]} (GT-Vision-Lab/VQA PythonEvaluationTools/"
                    f"vqaEvaluation/vqaEval.py) at {path}; set CM3EVAL_VQA_EVAL to the current file's path")
    return path


def to_python3(src: str) -> str:
    """The mechanical Python 2 -> 3 conversion: `print "text"` statements become print("text")."""
    out, n = re.subn(r'^(\s*)print (".*")\s*$', r"\1print(\2)", src, flags=re.M)
    assert n == 2, f"expected the file's 2 print statements, converted {n}"
    return out


def load_official(evaluation: str) -> type:
    module = types.ModuleType("vqaEval")
    exec(compile(to_python3(official_file(evaluation).read_text(encoding="utf-8")), "vqaEval.py", "exec"),
         module.__dict__)
    return module.VQAEval


class _Set:
    """What VQAEval reads of the official VQA class: qa {question_id: annotation or result}."""

    def __init__(self, qa: dict) -> None:
        self.qa = qa

    def getQuesIds(self) -> list:
        return list(self.qa)


@pytest.mark.parametrize("evaluation", ["current", "legacy-2017"])
def test_official_file_agrees_question_by_question(evaluation, capsys):
    VQAEval = load_official(evaluation)
    preds, anns = make_cases()
    ours = vqa_accuracy(preds, copy.deepcopy(anns), evaluation=evaluation)
    mine = dict(zip([a["question_id"] for a in anns], ours.per_sample.tolist()))
    gts = {a["question_id"]: a for a in anns}
    disagree = []
    for qid, pred in preds.items():
        one = VQAEval(_Set({qid: copy.deepcopy(gts[qid])}), _Set({qid: {"question_id": qid, "answer": pred}}), n=6)
        one.evaluate()
        if one.accuracy["overall"] != round(100 * mine[qid], 6):
            disagree.append((qid, pred, [x["answer"] for x in gts[qid]["answers"]], one.accuracy["overall"],
                             100 * mine[qid]))
    capsys.readouterr()  # the official progress bar
    assert not disagree, f"{len(disagree)} of {len(preds)} questions differ, e.g. {disagree[:3]}"
    # and the whole set at once, with the official 2-decimal overall number
    every = VQAEval(_Set(copy.deepcopy(gts)), _Set({q: {"question_id": q, "answer": p} for q, p in preds.items()}))
    every.evaluate()
    assert every.accuracy["overall"] == ours.value
