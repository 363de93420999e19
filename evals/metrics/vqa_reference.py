"""Line-by-line ports of the official VQA evaluation loop (slow; for tests and `bench metrics`).

Transcribed from GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py:
- `_evaluate_current`: `VQAEval.evaluate` at a013f0043c1e ("Fixed processing answers bug",
  2021-03-11), the file on master today;
- `_evaluate_legacy_2017`: the same method at a4f1afd59cfd ("updated for v2.0", 2017-10-02).
processPunctuation / processDigitArticle are ported separately from the vectorised module's
functions (`_official_punctuation`, `_official_digit_article`), sharing only the tables and regexes,
which are facts of the file. Python 2 -> 3: `print` dropped, the progress bar dropped; the caller's
annotations are copied, not edited in place as the official script does.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from evals.metrics.vqa import ARTICLES, COMMA_STRIP, CONTRACTIONS, EVALUATIONS, MANUAL_MAP, PERIOD_STRIP, PUNCT


def _official_punctuation(in_text: str) -> str:
    out_text = in_text
    for p in PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(COMMA_STRIP, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    out_text = PERIOD_STRIP.sub("", out_text, re.UNICODE)  # official: re.UNICODE lands in `count`
    return out_text


def _official_digit_article(in_text: str) -> str:
    out_text = []
    temp_text = in_text.lower().split()
    manual_map = dict(MANUAL_MAP)  # the official `setdefault` grows its map; a copy keeps ours intact
    for word in temp_text:
        word = manual_map.setdefault(word, word)
        if word not in ARTICLES:
            out_text.append(word)
        else:
            pass
    for word_id, word in enumerate(out_text):
        if word in CONTRACTIONS:
            out_text[word_id] = CONTRACTIONS[word]
    out_text = " ".join(out_text)
    return out_text


def _leave_one_out(answers: list[dict], res_ans: str) -> float:
    gt_acc = []
    for gt_ans_datum in answers:
        other_gt_ans = [item for item in answers if item != gt_ans_datum]
        matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
        acc = min(1, float(len(matching_ans)) / 3)
        gt_acc.append(acc)
    return float(sum(gt_acc)) / len(gt_acc)


def _evaluate_current(answers: list[dict], res_ans: str) -> float:
    for ans_dic in answers:
        ans_dic["answer"] = ans_dic["answer"].replace("\n", " ")
        ans_dic["answer"] = ans_dic["answer"].replace("\t", " ")
        ans_dic["answer"] = ans_dic["answer"].strip()
    res_ans = res_ans.replace("\n", " ")
    res_ans = res_ans.replace("\t", " ")
    res_ans = res_ans.strip()
    gt_answers = [ans["answer"] for ans in answers]

    if len(set(gt_answers)) > 1:
        for ans_dic in answers:
            ans_dic["answer"] = _official_punctuation(ans_dic["answer"])
            ans_dic["answer"] = _official_digit_article(ans_dic["answer"])
        res_ans = _official_punctuation(res_ans)
        res_ans = _official_digit_article(res_ans)
    return _leave_one_out(answers, res_ans)


def _evaluate_legacy_2017(answers: list[dict], res_ans: str) -> float:
    res_ans = res_ans.replace("\n", " ")
    res_ans = res_ans.replace("\t", " ")
    res_ans = res_ans.strip()
    res_ans = _official_punctuation(res_ans)
    res_ans = _official_digit_article(res_ans)
    gt_answers = [ans["answer"] for ans in answers]
    if len(set(gt_answers)) > 1:
        for ans_dic in answers:
            ans_dic["answer"] = _official_punctuation(ans_dic["answer"])
    return _leave_one_out(answers, res_ans)


def vqa_accuracy_reference(predictions: Mapping[Hashable, str], annotations: Sequence[Mapping],
                           evaluation: str = "current") -> dict[str, Any]:
    """The official VQAEval.evaluate + setAccuracy, per the chosen version (see the module docstring).

    Returns {"overall", "perQuestionType", "perAnswerType"} rounded as the official script, plus
    "overall_unrounded" and "accQA" (per-question accuracies in annotation order). Scores every
    annotation; the caller's annotations are not modified.
    """
    if evaluation not in EVALUATIONS:
        raise ValueError(f"unknown evaluation {evaluation!r} (known: {', '.join(EVALUATIONS)})")
    per_question = _evaluate_current if evaluation == "current" else _evaluate_legacy_2017
    acc_qa, acc_ques_type, acc_ans_type = [], {}, {}
    for ann in annotations:
        avg_gt_acc = per_question([dict(x) for x in ann["answers"]], predictions[ann["question_id"]])
        acc_qa.append(avg_gt_acc)
        acc_ques_type.setdefault(ann.get("question_type"), []).append(avg_gt_acc)
        acc_ans_type.setdefault(ann.get("answer_type"), []).append(avg_gt_acc)
    return {
        "overall": round(100 * float(sum(acc_qa)) / len(acc_qa), 2),
        "perQuestionType": {t: round(100 * float(sum(v)) / len(v), 2) for t, v in acc_ques_type.items()},
        "perAnswerType": {t: round(100 * float(sum(v)) / len(v), 2) for t, v in acc_ans_type.items()},
        "overall_unrounded": 100 * float(sum(acc_qa)) / len(acc_qa),
        "accQA": acc_qa,
    }
