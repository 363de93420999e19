"""A generated VQA case set that exercises every rule of the official answer processing.

Families (each a list of spellings of one answer, as annotators and models write them):
unanimous vs disagreeing answer sets, case, punctuation next to spaces and inside words, digit
commas, number words, articles, contractions, whitespace (\\n, \\t, leading / trailing spaces),
periods before / after digits. Every family is crossed with answer-set shapes (ten identical
spellings, ten identical after stripping only, a majority + dissent, an even split) and with every
spelling of the family (plus an unrelated answer and the empty string) as the prediction.
Deterministic: no randomness, so a failure names a reproducible question id.
"""

from __future__ import annotations

from typing import Any

FAMILIES: dict[str, list[str]] = {
    "case": ["yes", "Yes", "YES", "yEs"],
    "punct_space": ["hello world", "hello - world", "hello-world", "hello -world", "hello world!", "hello world !"],
    "punct_inside": ["t-shirt", "t shirt", "tshirt", "T-Shirt", "(t-shirt)", "t_shirt"],
    "digit_comma": ["2000", "2,000", "2, 000", "2 000", "yes, 2,000", "1,a"],
    "number_words": ["2", "two", "Two", "TWO", "two.", "none", "0", "zero"],
    "articles": ["dog", "the dog", "a dog", "The Dog", "an dog", "the", "a"],
    "contractions": ["don't", "dont", "Dont", "don't know", "dont know", "cant", "can't", "im", "Im"],
    "whitespace": ["red car", " red car", "red car ", "red\tcar", "red\ncar", "\tred car\n", "red  car"],
    "periods": ["3.5", "3.5.", "yes.", "st. louis", "st louis", ".5", "5.", "u.s.", "us"],
    "quotes_slashes": ['"yes"', "yes", "a/c", "a c", "ac", "[none]", "none", "n/a"],
}

# How the ten answers are drawn from a family's spellings (indices into the family list; wrapped).
SHAPES: dict[str, list[int]] = {
    "unanimous": [0] * 10,
    "unanimous_variant": [1] * 10,
    "majority": [0] * 7 + [1] * 2 + [2],
    "even_split": [0] * 5 + [1] * 5,
    "one_dissent": [1] * 9 + [2],
    "three_way": [0] * 4 + [1] * 3 + [2] * 3,
    "two_votes": [0] * 2 + [3] * 8,  # partial credit: 0.6 where spelling 0's form wins
    "three_votes": [0] * 3 + [3] * 7,
    "three_answers": [0, 0, 1],  # VizWiz / OK-VQA style short answer lists: 4/9
}

UNRELATED = "banana"


def _answers(family: list[str], shape: list[int]) -> list[str]:
    return [family[i % len(family)] for i in shape]


def make_cases() -> tuple[dict[int, str], list[dict[str, Any]]]:
    """(predictions {question_id: answer}, annotations in the official layout)."""
    preds: dict[int, str] = {}
    anns: list[dict[str, Any]] = []
    qid = 0
    for fam_name, family in FAMILIES.items():
        for shape_name, shape in SHAPES.items():
            answers = _answers(family, shape)
            for pred in [*family, UNRELATED, ""]:
                anns.append({"question_id": qid, "question_type": fam_name, "answer_type": shape_name,
                             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                         for j, a in enumerate(answers)]})
                preds[qid] = pred
                qid += 1
    return preds, anns
