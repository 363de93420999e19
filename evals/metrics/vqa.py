"""VQA accuracy exactly as the official VQAv2 evaluation (GT-Vision-Lab/VQA, vqaEval.py) computes it.

Two versions of the official loop exist; `evaluation=` picks one and the result records it:
- "current" (default): vqaEval.py since commit a013f0043c1e "Fixed processing answers bug"
  (2021-03-11). Per question: "\n" and "\t" become spaces and strip() is applied to the ten
  answers and to the prediction; then, ONLY IF the (stripped) answers are not all the same string,
  processPunctuation and then processDigitArticle are applied to every answer and to the
  prediction; otherwise the stripped strings are compared as they are ("Yes" against ten "yes"
  scores 0, "yes " scores 100).
- "legacy-2017": the loop before that commit (v2.0 release, 2017-10-02), for comparing with older
  papers: the prediction is always stripped, punctuation- and digit/article-processed; the answers
  are left untouched when all are the same string, otherwise processPunctuation only (no
  lower-casing, no digit/article/contraction step, no strip).
Then, for each ground-truth answer: count the matches among the *other* answers,
acc = min(1, matches / 3); the question's accuracy is the mean over its answers; overall / per
question type / per answer type = 100 x mean over questions, reported rounded to 2 decimals (the
unrounded numbers are kept in `extra`).

The same rule serves VizWiz, OK-VQA and TextVQA with however many answers a question has
(leave-one-out over the n answers, min(1, m/3), mean over the n).

Leave-one-out is by position. The official script removes every answer *record* equal to the
left-out one (`item != gtAnsDatum` on dicts); with the official files each record has its own
`answer_id`, so this is the same thing.

The official script is Python 2: its regexes (`\\d`) match ASCII digits only, which re.ASCII
reproduces here.

`vqa_accuracy` is vectorised: each distinct string is normalised once, answers become integer ids
in an [N, K] matrix and the leave-one-out counts are numpy operations. Sums are taken in the
official order (sequentially, question by question), so it reproduces the official numbers bit for
bit; `evals.metrics.vqa_reference` holds line-by-line ports of both official loops, kept for tests
and the benchmark.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evals.metrics.result import MetricResult
from evals.metrics.official_files import read_json, read_results

# ---- The official normalisation tables (facts of vqaEval.py, reproduced verbatim, quirks included:
# the capitalised keys can never match because processDigitArticle lower-cases first).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# Official regexes, verbatim. "(?!<=\d)" is a (buggy) look-ahead, not a look-behind, so in effect a
# period is removed unless a digit follows it.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)", re.ASCII)
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official call is periodStrip.sub("", text, re.UNICODE): the flag lands in `count`, so at most
# re.UNICODE == 32 periods are removed. Reproduced on purpose.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_ANY_PUNCT = re.compile("[" + re.escape("".join(PUNCT) + ".") + "]")

EVALUATIONS = ("current", "legacy-2017")
EVALUATION_SOURCES = {
    "current": "GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py @ a013f0043c1e (2021-03-11)",
    "legacy-2017": "GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py @ a4f1afd59cfd (2017-10-02)",
}


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def process_punctuation(text: str) -> str:
    """The official processPunctuation. A punctuation mark is deleted when it touches a space somewhere
    in the text (or the text has a digit,digit comma anywhere), else replaced by a space."""
    if not _ANY_PUNCT.search(text):  # nothing to do: every step below would be a no-op
        return text
    has_digit_comma = COMMA_STRIP.search(text) is not None  # the official loop recomputes this per mark
    out = text
    for p in PUNCT:
        if p + " " in text or " " + p in text or has_digit_comma:  # tests the input, not `out` (official)
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official processDigitArticle: lower-case, number words -> digits, drop articles, contractions."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def strip_answer(answer: str) -> str:
    """The official first step for every string: newlines and tabs become spaces, then strip()."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_prediction(answer: str) -> str:
    """Strip, processPunctuation, processDigitArticle: what the current loop does to every string of a
    question whose answers disagree, and what the legacy loop does to every prediction."""
    return process_digit_article(process_punctuation(strip_answer(answer)))


# --------------------------------------------------------------------------------------------
# The vectorised metric
# --------------------------------------------------------------------------------------------


def _check(predictions: Mapping, annotations: Sequence[Mapping], allow_missing: bool) -> Sequence[Mapping]:
    if not predictions:
        raise ValueError("VQA accuracy: no predictions")
    if not annotations:
        raise ValueError("VQA accuracy: no annotations")
    try:
        qids = [a["question_id"] for a in annotations]
    except (KeyError, TypeError):
        n = next(n for n, a in enumerate(annotations) if not isinstance(a, Mapping) or "question_id" not in a)
        raise ValueError(f"VQA accuracy: annotation {n} has no 'question_id'") from None
    known = set(qids)
    if len(known) != len(qids):
        seen: set = set()
        dup = next(q for q in qids if q in seen or seen.add(q))
        raise ValueError(f"VQA accuracy: question {dup} appears more than once in the annotations")
    unknown = [q for q in predictions if q not in known]
    if unknown:
        raise ValueError(f"VQA accuracy: {len(unknown)} predicted question ids are not in the annotations, e.g. {unknown[:5]}")
    bad = [q for q, p in predictions.items() if not isinstance(p, str)]
    if bad:
        raise TypeError(f"VQA accuracy: predicted answers must be strings; not so for question ids {bad[:5]}")
    if len(predictions) == len(qids):
        return annotations
    if not allow_missing:
        missing = [q for q in qids if q not in predictions]
        raise ValueError(f"VQA accuracy: {len(missing)} questions have no prediction, e.g. {missing[:5]} "
                         "(allow_missing=True scores only the predicted ones)")
    return [a for a in annotations if a["question_id"] in predictions]


def _bootstrap_mean_ci(x: np.ndarray, *, seed: int = 0, n_resamples: int = 1000,
                       confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, drawn as multinomial counts over the distinct values of x.

    Resampling n items with replacement is the same as drawing how often each distinct value comes up
    (multinomial with the empirical frequencies); per-question VQA accuracies take a handful of values,
    so this costs O(n_resamples x distinct) instead of the O(n_resamples x n) memory and time of
    index resampling (3 GB for VQAv2 val).
    """
    values, freq = np.unique(x, return_counts=True)
    counts = np.random.default_rng(seed).multinomial(x.size, freq / x.size, size=n_resamples)
    means = counts @ values / x.size
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _sequential_sum(x: np.ndarray) -> float:
    """Left-to-right float sum, as Python's sum() over a list (numpy's sum is pairwise)."""
    return float(np.cumsum(x)[-1]) if x.size else 0.0


def _breakdown(acc: np.ndarray, labels: list) -> dict[Any, dict[str, float | int]]:
    """Official per-type numbers, types in first-appearance order."""
    codes: dict = {}
    inv = np.fromiter((codes.setdefault(t, len(codes)) for t in labels), dtype=np.int64, count=len(labels))
    out = {}
    for t, c in codes.items():
        vals = acc[inv == c]
        unrounded = 100 * _sequential_sum(vals) / len(vals)
        out[t] = {"value": round(unrounded, 2), "unrounded": unrounded, "n": int(len(vals))}
    return out


def _answer_matrix(annotations: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """(answer counts [N], raw answer ids [N, K] (-1 = padding), valid mask [N, K], raw vocabulary)."""
    try:
        counts = np.array([len(a["answers"]) for a in annotations], dtype=np.int64)
        # Raw answer strings -> ids: one dict lookup per answer; all string work is per distinct string.
        raw_vocab: dict[str, int] = {}
        flat = [raw_vocab.setdefault(x["answer"], len(raw_vocab)) for a in annotations for x in a["answers"]]
    except (KeyError, TypeError):
        q = next(a.get("question_id") for a in annotations
                 if not isinstance(a.get("answers"), list)
                 or not all(isinstance(x, Mapping) and "answer" in x for x in a["answers"]))
        raise ValueError(f"VQA accuracy: question {q} needs an 'answers' list of {{'answer': ...}} records") from None
    if not counts.all():
        empty = [a["question_id"] for a in annotations if not a["answers"]]
        raise ValueError(f"VQA accuracy: questions without ground-truth answers, e.g. {empty[:5]}")
    not_str = [s for s in raw_vocab if not isinstance(s, str)]
    if not_str:
        raise TypeError(f"VQA accuracy: ground-truth answers must be strings, got e.g. {not_str[:3]}")
    k = int(counts.max())
    valid = np.arange(k)[None, :] < counts[:, None]
    raw = np.full((len(annotations), k), -1, dtype=np.int64)
    raw[valid] = flat  # row-major: each row's answers in order
    return counts, raw, valid, raw_vocab


def _unanimous(ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rows whose valid entries are all one id."""
    return np.all((ids == ids[:, :1]) | ~valid, axis=1)


def _compared_strings(raw: np.ndarray, valid: np.ndarray, raw_vocab: dict[str, int], preds: list[str],
                      evaluation: str) -> tuple[np.ndarray, np.ndarray]:
    """(answer ids [N, K], prediction ids [N]) of the strings each version compares, in one id space.

    A prediction string no answer has gets -2: it matches nothing (padding is -1)."""
    final: dict[str, int] = {}

    def ids(fn) -> np.ndarray:
        return np.array([final.setdefault(fn(s), len(final)) for s in raw_vocab], dtype=np.int64)

    pred_vocab: dict[str, int] = {}
    pred_raw = np.array([pred_vocab.setdefault(p, len(pred_vocab)) for p in preds], dtype=np.int64)

    def pred_ids(fn) -> np.ndarray:
        return np.array([final.get(fn(p), -2) for p in pred_vocab], dtype=np.int64)[pred_raw]

    if evaluation == "current":
        stripped = ids(strip_answer)
        unanimous = _unanimous(np.where(valid, stripped[raw], -1), valid)  # judged after stripping
        normed = ids(normalize_prediction)
        gt = np.where(unanimous[:, None], stripped[raw], normed[raw])
        pred = np.where(unanimous, pred_ids(strip_answer), pred_ids(normalize_prediction))
    else:  # legacy-2017: answers untouched when unanimous (raw strings), else punctuation only
        unanimous = _unanimous(raw, valid)
        as_is = ids(lambda x: x)
        punct = ids(process_punctuation)
        gt = np.where(unanimous[:, None], as_is[raw], punct[raw])
        pred = pred_ids(normalize_prediction)
    gt[~valid] = -1
    return gt, pred


def vqa_per_question(predictions: Mapping[Hashable, str], annotations: Sequence[Mapping],
                     evaluation: str = "current") -> np.ndarray:
    """Per-question accuracy in [0, 1] for `annotations` (every one must have a prediction), vectorised."""
    if evaluation not in EVALUATIONS:
        raise ValueError(f"VQA accuracy: unknown evaluation {evaluation!r} (known: {', '.join(EVALUATIONS)})")
    counts, raw, valid, raw_vocab = _answer_matrix(annotations)
    gt, pred = _compared_strings(raw, valid, raw_vocab, [predictions[a["question_id"]] for a in annotations],
                                 evaluation)
    eq = gt == pred[:, None]
    total = eq.sum(axis=1)
    acc_sum = np.zeros(len(annotations))
    for j in range(raw.shape[1]):  # column by column: the official left-to-right sum over the answers
        others = (total - eq[:, j]).astype(np.float64)
        acc_sum += np.where(valid[:, j], np.minimum(1.0, others / 3), 0.0)
    return acc_sum / counts


def vqa_accuracy(
    predictions: Mapping[Hashable, str],
    annotations: Sequence[Mapping],
    *,
    allow_missing: bool = False,
    seed: int = 0,
    evaluation: str = "current",
) -> MetricResult:
    """Official VQA accuracy (0-100) of predictions {question_id: answer} against annotations in the
    official layout ([{"question_id", "answers": [{"answer", ...}], "question_type", "answer_type"}]).

    value: overall accuracy rounded to 2 decimals as the official script reports it; ci: 95 % bootstrap
    over questions (unrounded, same scale); per_sample: per-question accuracy in [0, 1], in annotation
    order; extra: "unrounded", "per_answer_type" and "per_question_type" ({type: {value, unrounded, n}}),
    "n_missing" (questions without prediction, left out; only with allow_missing=True), "evaluation"
    (which official loop, see the module docstring) and "evaluation_source" (its file and commit).
    Empty predicted strings are valid answers. Predicted ids absent from the annotations are an error.
    """
    if evaluation not in EVALUATIONS:
        raise ValueError(f"VQA accuracy: unknown evaluation {evaluation!r} (known: {', '.join(EVALUATIONS)})")
    selected = _check(predictions, annotations, allow_missing)
    acc = vqa_per_question(predictions, selected, evaluation)
    unrounded = 100 * _sequential_sum(acc) / len(acc)
    lo, hi = _bootstrap_mean_ci(acc, seed=seed)
    extra: dict[str, Any] = {"unrounded": unrounded, "evaluation": evaluation,
                             "evaluation_source": EVALUATION_SOURCES[evaluation]}
    for key, field in (("per_answer_type", "answer_type"), ("per_question_type", "question_type")):
        if all(field in a for a in selected):
            extra[key] = _breakdown(acc, [a[field] for a in selected])
    extra["n_missing"] = len(annotations) - len(selected)
    return MetricResult("vqa_accuracy", round(unrounded, 2), (100 * lo, 100 * hi), len(acc), acc, extra)


# --------------------------------------------------------------------------------------------
# Official file formats
# --------------------------------------------------------------------------------------------


def load_vqa_files(results_path: str | Path, questions_path: str | Path,
                   annotations_path: str | Path) -> tuple[dict, list[dict]]:
    """Official VQAv2 JSONs -> (predictions {question_id: answer}, annotations list).

    results: [{"question_id", "answer"}]; questions: {"questions": [{"question_id", ...}]};
    annotations: {"annotations": [{"question_id", "answers", "question_type", "answer_type", ...}]}.
    As the official loader, the questions and annotations must cover the same question ids.
    """
    predictions = read_results(results_path, "question_id", "answer", duplicate="is answered more than once")
    questions = read_json(questions_path)
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise ValueError(f"{questions_path}: expected an official questions file with a 'questions' list")
    ann = read_json(annotations_path)
    if not isinstance(ann, dict) or not isinstance(ann.get("annotations"), list):
        raise ValueError(f"{annotations_path}: expected an official annotations file with an 'annotations' list")
    q_ids = {q.get("question_id") for q in questions["questions"]}
    a_ids = {a.get("question_id") for a in ann["annotations"]}
    if q_ids != a_ids:
        diff = sorted(q_ids ^ a_ids, key=str)[:5]
        raise ValueError(f"{questions_path} and {annotations_path} cover different question ids, e.g. {diff}")
    return predictions, ann["annotations"]
