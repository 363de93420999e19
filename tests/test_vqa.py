"""Official VQA accuracy: normalisation rules, leave-one-out arithmetic, breakdowns, errors, and the
vectorised implementation against line-by-line ports of the official loop.

Two official loops: "current" (GT-Vision-Lab/VQA vqaEval.py at a013f0043c1e, 2021-03-11, the
default) and "legacy-2017" (the same file at a4f1afd59cfd). The rule tests below state what each
loop gives; the ports in evals/metrics/vqa_reference.py were transcribed from those two commits
(and checked against the files themselves on the generated case set in tests/vqa_cases.py)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from evals.bench.metrics import make_vqa_benchmark
from evals.metrics.vqa import (
    EVALUATIONS,
    normalize_prediction,
    process_digit_article,
    process_punctuation,
    strip_answer,
    vqa_accuracy,
)
from evals.metrics.vqa_reference import _official_digit_article, _official_punctuation, vqa_accuracy_reference
from vqa_cases import FAMILIES, make_cases


def q(answers: list[str], qid: int = 1, qtype: str = "what is", atype: str = "other") -> dict:
    return {"question_id": qid, "question_type": qtype, "answer_type": atype,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)]}


def acc1(answers: list[str], pred: str, evaluation: str = "current") -> float:
    """Accuracy (0..1) of one question, checked against the reference port on the way."""
    anns = [q(answers)]
    res = vqa_accuracy({1: pred}, anns, evaluation=evaluation)
    ref = vqa_accuracy_reference({1: pred}, anns, evaluation)
    assert res.per_sample[0] == ref["accQA"][0]
    assert res.extra["evaluation"] == evaluation
    return float(res.per_sample[0])


LEGACY = "legacy-2017"


# ---------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("text, expected", [
    ("hello-world", "hello world"),      # mark not touching a space: replaced by a space
    ("t-shirt", "t shirt"),
    ("hello - world", "hello  world"),   # touches a space: deleted
    ("a - b-c", "a  bc"),                 # the test is on the whole input: every '-' deleted
    ("red, blue", "red blue"),
    ("red,blue", "red blue"),
    ("2,000", "2000"),                    # digit,digit comma: every mark deleted
    ("yes, 2,000", "yes 2000"),
    ("1,a", "1 a"),                       # no digit on both sides: the comma rule does not fire
    ("(unknown)", " unknown "),
    ("hi!", "hi "),
    ("hi !", "hi "),
    ("a/c", "a c"),
    ("yes.", "yes"),                      # periods go unless a digit follows
    ("3.5", "3.5"),
    ("5.", "5"),
    (".5", ".5"),
    ("st. louis", "st louis"),
    ("u.s.", "us"),
    ("1.5.", "1.5"),
    ("don't", "don't"),                   # apostrophe, colon, #, %, $ are not in the list
    ("12:30", "12:30"),
    ("#1 50% $5", "#1 50% $5"),
    ("a" + "." * 40, "a" + "." * 8),      # official passes re.UNICODE (32) as `count`
])
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected
    assert _official_punctuation(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Two Dogs", "2 dogs"),
    ("the cat", "cat"),
    ("a an the", ""),
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),
    ("dont", "don't"),
    ("Dont know", "don't know"),
    ("Im", "im"),                 # the table's "Im" key can never match after lower-casing
    ("somebody'd", "somebodyd"),  # the official table maps this one backwards
    ("  spaced   out ", "spaced out"),
])
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected
    assert _official_digit_article(text) == expected


def test_normalize_prediction_strips_then_normalises():
    assert normalize_prediction("\tThe Two dogs.\n") == "2 dogs"
    assert normalize_prediction("  ") == ""


# ---------------------------------------------------------------------------- the accuracy rule


@pytest.mark.parametrize("evaluation", EVALUATIONS)
@pytest.mark.parametrize("m, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_counts(m, expected, evaluation):
    # m answers match: each matching answer sees m-1 matches among the others, each other one sees m.
    # m=1: (1*0 + 9*1/3)/10 = .3; m=2: (2*1/3 + 8*2/3)/10 = .6; m=3: (3*2/3 + 7*1)/10 = .9
    answers = ["cat"] * m + ["dog"] * (10 - m)
    assert acc1(answers, "cat", evaluation) == pytest.approx(expected, abs=1e-12)


# --- the current official loop (default)


def test_current_unanimous_answers_are_compared_stripped_only():
    # All ten answers the same (after strip): nothing else is applied, to the answers or the prediction.
    assert acc1(["yes"] * 10, "Yes") == 0.0        # no lower-casing
    assert acc1(["yes"] * 10, "yes.") == 0.0       # no punctuation processing
    assert acc1(["yes"] * 10, " yes\n") == 1.0     # \n -> space, then strip
    assert acc1(["yes."] * 10, "yes.") == 1.0
    assert acc1(["a"] * 10, "a") == 1.0            # the article is not removed either
    assert acc1(["two"] * 10, "2") == 0.0          # no number words
    # Unanimity is judged after stripping: "yes " and "yes" are the same answer.
    assert acc1(["yes "] * 9 + ["yes"], "Yes") == 0.0
    assert acc1(["red\tcar"] * 10, "red car") == 1.0


def test_current_disagreeing_answers_and_prediction_are_fully_normalised():
    # Not unanimous: processPunctuation then processDigitArticle on every answer AND the prediction.
    assert acc1(["Two"] * 9 + ["2"], "two") == 1.0            # all become "2"
    assert acc1(["2,000"] * 5 + ["2000"] * 5, "2,000") == 1.0  # digit comma removed on both sides
    assert acc1(["the dog"] * 9 + ["cat"], "the dog") == 1.0   # articles dropped on both sides
    assert acc1(["Red"] * 5 + ["red"] * 5, "RED") == 1.0       # case
    assert acc1(["none"] * 4 + ["0"] * 6, "zero") == 1.0       # number words, "none" -> 0
    assert acc1(["hello - world"] * 5 + ["hello world"] * 5, "hello-world") == 1.0  # marks next to spaces
    assert acc1(["don't"] * 3 + ["no"] * 7, "dont") == pytest.approx(0.9, abs=1e-12)  # contractions
    assert acc1(["t-shirt"] * 2 + ["shirt"] * 8, "T-Shirt") == pytest.approx(0.6, abs=1e-12)


# --- the legacy (pre-2021) loop, kept for comparing with older papers


def test_legacy_unanimous_answers_are_not_normalised():
    # Ten identical answers stay as they are; the prediction is always normalised.
    assert acc1(["yes."] * 10, "yes.", LEGACY) == 0.0   # prediction becomes "yes", answers stay "yes."
    assert acc1(["yes"] * 10, "Yes.", LEGACY) == 1.0
    assert acc1(["Yes"] * 10, "Yes", LEGACY) == 0.0     # prediction lower-cased, answers not
    # One differing answer: punctuation processing applies to the answers.
    assert acc1(["yes."] * 9 + ["no"], "yes", LEGACY) == 1.0


def test_legacy_disagreeing_answers_get_punctuation_only():
    # Answers are not lower-cased nor digit-mapped: "Two" never equals the prediction's "2".
    assert acc1(["Two"] * 9 + ["2"], "two", LEGACY) == pytest.approx(0.3, abs=1e-12)
    assert acc1(["two"] * 9 + ["2"], "2", LEGACY) == pytest.approx(0.3, abs=1e-12)
    # Punctuation and digit commas on the answer side:
    assert acc1(["2,000"] * 5 + ["2000"] * 5, "2000", LEGACY) == 1.0
    assert acc1(["t-shirt"] * 2 + ["shirt"] * 8, "T-Shirt", LEGACY) == pytest.approx(0.6, abs=1e-12)
    # Articles in a prediction vanish; in disagreeing answers they stay.
    assert acc1(["the dog"] * 5 + ["dog"] * 5, "the dog", LEGACY) == 1.0           # prediction -> "dog"
    assert acc1(["the dog"] * 9 + ["cat"], "the dog", LEGACY) == 0.0
    # Contractions: prediction "dont" -> "don't".
    assert acc1(["don't"] * 3 + ["no"] * 7, "dont", LEGACY) == pytest.approx(0.9, abs=1e-12)


@pytest.mark.parametrize("evaluation", EVALUATIONS)
def test_variable_answer_counts(evaluation):
    # 3 answers (cat, cat, dog), prediction cat: (1/3 + 1/3 + 2/3) / 3 = 4/9
    assert acc1(["cat", "cat", "dog"], "cat", evaluation) == pytest.approx(4 / 9, abs=1e-12)
    # A single answer has no "others": always 0, as in the official loop.
    assert acc1(["cat"], "cat", evaluation) == 0.0
    # OK-VQA style: 5 answers repeated twice.
    five = ["red", "red", "blue", "red", "dark red"]
    assert acc1(five * 2, "red", evaluation) == 1.0
    assert acc1(five * 2, "blue", evaluation) == pytest.approx(0.6, abs=1e-12)


@pytest.mark.parametrize("evaluation", EVALUATIONS)
def test_empty_prediction_is_a_valid_answer(evaluation):
    assert acc1(["yes"] * 10, "", evaluation) == 0.0
    assert acc1(["", "", "", "x"], "", evaluation) == pytest.approx(0.75, abs=1e-12)


def test_strip_answer():
    assert strip_answer("\tThe Two dogs.\n") == "The Two dogs."
    assert strip_answer("a\nb") == "a b"


def test_overall_and_breakdowns_current():
    anns = [q(["2"] * 10, 1, "how many", "number"),
            q(["2"] * 1 + ["3"] * 9, 2, "how many", "number"),
            q(["yes"] * 10, 3, "is the", "yes/no")]
    preds = {1: "two", 2: "2", 3: "no"}  # "two" is not "2" when the ten answers agree
    res = vqa_accuracy(preds, anns)
    np.testing.assert_allclose(res.per_sample, [0.0, 0.3, 0.0], atol=1e-12)
    assert res.value == 10.0 and res.extra["evaluation"] == "current"
    assert "a013f0043c1e" in res.extra["evaluation_source"]
    ref = vqa_accuracy_reference(preds, anns)
    assert ref["overall"] == 10.0 and ref["perQuestionType"] == {"how many": 15.0, "is the": 0.0}


def test_overall_and_breakdowns():
    anns = [q(["2"] * 10, 1, "how many", "number"),
            q(["2"] * 1 + ["3"] * 9, 2, "how many", "number"),
            q(["yes"] * 10, 3, "is the", "yes/no")]
    preds = {1: "two", 2: "2", 3: "no"}
    res = vqa_accuracy(preds, anns, evaluation=LEGACY)
    np.testing.assert_allclose(res.per_sample, [1.0, 0.3, 0.0], atol=1e-12)
    assert res.value == 43.33 and res.extra["unrounded"] == pytest.approx(130 / 3)
    assert res.n == 3 and res.extra["n_missing"] == 0
    assert res.extra["per_question_type"] == {
        "how many": {"value": 65.0, "unrounded": pytest.approx(65.0), "n": 2},
        "is the": {"value": 0.0, "unrounded": 0.0, "n": 1}}
    assert {t: d["value"] for t, d in res.extra["per_answer_type"].items()} == {"number": 65.0, "yes/no": 0.0}
    lo, hi = res.ci
    assert 0.0 <= lo <= res.extra["unrounded"] <= hi <= 100.0
    ref = vqa_accuracy_reference(preds, anns, LEGACY)
    assert ref["overall"] == 43.33 and ref["perQuestionType"] == {"how many": 65.0, "is the": 0.0}


# ---------------------------------------------------------------------------- errors


def test_errors_are_clear():
    anns = [q(["a"] * 10, 1), q(["b"] * 10, 2), q(["c"] * 10, 3)]
    with pytest.raises(ValueError, match="no predictions"):
        vqa_accuracy({}, anns)
    with pytest.raises(ValueError, match=r"2 questions have no prediction, e\.g\. \[2, 3\]"):
        vqa_accuracy({1: "a"}, anns)
    with pytest.raises(ValueError, match=r"not in the annotations, e\.g\. \[99\]"):
        vqa_accuracy({1: "a", 2: "b", 3: "c", 99: "x"}, anns)
    with pytest.raises(TypeError, match="must be strings"):
        vqa_accuracy({1: "a", 2: 7, 3: "c"}, anns)
    with pytest.raises(ValueError, match="without ground-truth answers"):
        vqa_accuracy({1: "a"}, [{"question_id": 1, "answers": []}])
    with pytest.raises(ValueError, match="appears more than once"):
        vqa_accuracy({1: "a"}, [q(["a"], 1), q(["a"], 1)])
    with pytest.raises(ValueError, match="'answers' list"):
        vqa_accuracy({1: "a"}, [{"question_id": 1, "answers": [{"text": "a"}]}])
    with pytest.raises(ValueError, match="unknown evaluation 'v3'"):
        vqa_accuracy({1: "a"}, [q(["a"], 1)], evaluation="v3")


def test_allow_missing_scores_only_predicted_questions():
    anns = [q(["cat"] * 10, 1), q(["dog"] * 10, 2), q(["cow"] * 10, 3)]
    res = vqa_accuracy({1: "cat", 3: "x"}, anns, allow_missing=True)
    assert res.n == 2 and res.extra["n_missing"] == 1 and res.value == 50.0


def test_article_answer_quirk():
    # Legacy: the prediction "a" is an article: normalised to "", it cannot match ten unanimous "a".
    assert acc1(["a"] * 10, "a", LEGACY) == 0.0
    # Current: ten unanimous "a" are compared as they are, so the prediction "a" matches.
    assert acc1(["a"] * 10, "a") == 1.0


# ---------------------------------------------------------------------------- vectorised == official loop


def _noisy_fuzz(n: int, seed: int) -> tuple[dict, list[dict]]:
    """Random short strings over an alphabet rich in the characters the rules care about,
    variable answer counts (1-10), many near-duplicates."""
    rng = random.Random(seed)
    alphabet = list("ab2 ,.-!?()'/\"") + ["the ", "a ", "two ", "Two ", "dont ", "1,000", "3.5", " . "]
    pool = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5))) for _ in range(300)]
    anns, preds = [], {}
    for i in range(n):
        k = rng.randint(1, 10)
        if rng.random() < 0.25:
            answers = [rng.choice(pool)] * k
        else:
            base = rng.sample(pool, 3)
            answers = [rng.choice(base) for _ in range(k)]
        anns.append(q(answers, qid=i, qtype=rng.choice(["t1", "t2", "t3"]), atype=rng.choice(["u", "v"])))
        preds[i] = rng.choice(answers + pool[:20] + ["\n" + answers[0] + "\t"])
    return preds, anns


@pytest.mark.parametrize("evaluation", EVALUATIONS)
@pytest.mark.parametrize("make", [lambda: make_vqa_benchmark(3000, seed=1), lambda: _noisy_fuzz(4000, seed=2),
                                  make_cases], ids=["realistic", "fuzz", "rule-cases"])
def test_vectorised_matches_reference_exactly(make, evaluation):
    preds, anns = make()
    res = vqa_accuracy(preds, anns, evaluation=evaluation)
    ref = vqa_accuracy_reference(preds, anns, evaluation)
    assert np.array_equal(res.per_sample, np.asarray(ref["accQA"]))  # bit for bit
    assert res.value == ref["overall"] and res.extra["unrounded"] == ref["overall_unrounded"]
    assert {t: d["value"] for t, d in res.extra["per_question_type"].items()} == ref["perQuestionType"]
    assert {t: d["value"] for t, d in res.extra["per_answer_type"].items()} == ref["perAnswerType"]
    # Non-trivial data: a spread of accuracies, both unanimous and disagreeing questions.
    assert len(np.unique(res.per_sample)) > 5 and 5 < res.value < 95


def test_rule_cases_cover_every_family_and_separate_the_versions():
    """The generated case set exercises every rule family, and in every family the two official
    loops disagree somewhere (so a port of the wrong loop cannot pass the test above)."""
    preds, anns = make_cases()
    cur = vqa_accuracy(preds, anns).per_sample
    old = vqa_accuracy(preds, anns, evaluation=LEGACY).per_sample
    families = np.array([a["question_type"] for a in anns])
    assert set(families) == set(FAMILIES)
    for fam in FAMILIES:
        sel = families == fam
        assert (cur[sel] != old[sel]).any(), fam
        assert len(np.unique(cur[sel])) > 2, fam  # hits, misses and partial credit
    shapes = {a["answer_type"] for a in anns}
    assert {"unanimous", "unanimous_variant", "even_split"} <= shapes


def test_reference_does_not_modify_annotations():
    preds, anns = make_vqa_benchmark(50, seed=3)
    before = json.dumps(anns)
    for evaluation in EVALUATIONS:
        vqa_accuracy_reference(preds, anns, evaluation)
        vqa_accuracy(preds, anns, evaluation=evaluation)
    assert json.dumps(anns) == before


# ---------------------------------------------------------------------------- files and CLI


def _write_official(tmp_path, preds: dict, anns: list[dict]):
    (tmp_path / "res.json").write_text(json.dumps([{"question_id": k, "answer": v} for k, v in preds.items()]))
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": a["question_id"], "image_id": 1,
                                                                "question": "?"} for a in anns]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": anns}))
    return [str(tmp_path / f) for f in ("res.json", "q.json", "a.json")]


def _cli():
    from evals.cli.score import vqa

    app = typer.Typer()
    app.command()(vqa)
    return app


def test_cli_json_matches_function(tmp_path):
    preds, anns = make_vqa_benchmark(300, seed=4)
    res_f, q_f, a_f = _write_official(tmp_path, preds, anns)
    out = CliRunner().invoke(_cli(), [res_f, "--questions", q_f, "--annotations", a_f, "--json"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    expected = vqa_accuracy(preds, anns)
    assert got["vqa_accuracy"]["value"] == expected.value and got["vqa_accuracy"]["n"] == 300
    assert got["vqa_accuracy"]["ci"] == pytest.approx(list(expected.ci))
    assert set(got["vqa_accuracy"]["extra"]["per_answer_type"]) == {"yes/no", "number", "other"}
    assert got["vqa_accuracy"]["extra"]["evaluation"] == "current" and got["vqa_accuracy"]["higher_is_better"] is True
    table = CliRunner().invoke(_cli(), [res_f, "--questions", q_f, "--annotations", a_f])
    assert table.exit_code == 0 and "vqa_accuracy" in table.output and str(expected.value) in table.output
    legacy = CliRunner().invoke(_cli(), [res_f, "--questions", q_f, "--annotations", a_f, "--legacy", "--json"])
    assert legacy.exit_code == 0, legacy.output
    got_legacy = json.loads(legacy.output)["vqa_accuracy"]
    assert got_legacy["extra"]["evaluation"] == LEGACY
    assert got_legacy["value"] == vqa_accuracy(preds, anns, evaluation=LEGACY).value != expected.value


def test_cli_errors_are_one_line(tmp_path):
    preds, anns = make_vqa_benchmark(20, seed=5)
    preds.pop(next(iter(preds)))
    res_f, q_f, a_f = _write_official(tmp_path, preds, anns)
    out = CliRunner().invoke(_cli(), [res_f, "--questions", q_f, "--annotations", a_f])
    assert out.exit_code == 2
    assert out.output.strip().startswith("error:") and "no prediction" in out.output
    assert len(out.output.strip().splitlines()) == 1
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": 1}]}))
    out = CliRunner().invoke(_cli(), [res_f, "--questions", q_f, "--annotations", a_f])
    assert out.exit_code == 2 and "cover different question ids" in out.output
