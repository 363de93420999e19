"""Captioning metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, and SPICE when installed.

`caption_metrics(predictions, references)` scores one caption per image against that image's
reference captions, exactly as the COCO caption toolkit does (pycocoevalcap 1.2), with three
changes that do not alter any number:

- PTB tokenization calls the toolkit's own Stanford jar with the toolkit's own options and
  punctuation list, but writes its temporary file in a private temp dir (pycocoevalcap writes it
  into its package folder: unsafe for concurrent runs, impossible on read-only installs).
- METEOR drives the toolkit's METEOR 1.5 jar with the toolkit's command line and protocol, one
  process per call, always shut down afterwards.
- SPICE runs only when its jar and the Stanford CoreNLP 3.6.0 jars it needs are already present
  (pycocoevalcap would download them, which fails offline); otherwise it is reported unavailable.

Scales are pycocoevalcap's raw ones (CIDEr 1.242, not 124.2; BLEU in [0, 1]).

CIDEr is CIDEr-D (sigma 6, clipped counts, length penalty) and its idf comes from the reference
captions of the images being scored: a score over a subset of a split is not comparable to a
score over the full split. `extra["idf_over"]` records how many images the idf was computed over.

Confidence intervals (95 %, percentile bootstrap over images, seeded):
- ROUGE-L, CIDEr, SPICE are means of per-image scores: the usual bootstrap of the mean.
- BLEU-n is a corpus statistic (summed n-gram counts and lengths, then one brevity penalty), not
  a mean of sentence BLEUs; its CI resamples images and recomputes corpus BLEU from the per-image
  counts (vectorised, cheap).
- METEOR is also corpus-level (the jar sums per-image statistics before scoring); its CI resamples
  images, sums their statistics and asks the same jar for the aggregate score of each resample.
`per_sample` always holds the per-image scores the toolkit reports (sentence BLEU, segment
METEOR, ...), in the iteration order of `predictions`.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import re
import subprocess
import tempfile
import threading
from collections import defaultdict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from evals.metrics.result import MetricResult, mean_result
from evals.metrics.official_files import read_json, read_results

# Tokens that pycocoevalcap's PTBTokenizer drops after tokenizing (a fact about the toolkit).
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# With -preserveLines the Stanford tokenizer also ends a line at these characters. pycocoevalcap only
# replaces "\n", so a caption holding one of the others shifts every later caption onto the wrong image;
# we replace them all by a space (identical tokens otherwise) and check the line count.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\u2028\u2029]")

BLEU_N = 4
N_RESAMPLES = 1000
METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")

Tokenize = Literal["ptb", "none"]


def _toolkit_dir(sub: str) -> Path:
    """A folder of the installed pycocoevalcap (a namespace package: no __file__)."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pycocoevalcap is not installed (pip install pycocoevalcap)")
    return Path(list(spec.submodule_search_locations)[0]) / sub


def _run_java(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, **kwargs)
    except FileNotFoundError as e:
        raise RuntimeError("captioning metrics need Java (a `java` on PATH) for the PTB tokenizer, METEOR and SPICE") from e


# --------------------------------------------------------------------------------------------
# PTB tokenization
# --------------------------------------------------------------------------------------------


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """pycocoevalcap's PTBTokenizer.tokenize, on {id: [caption, ...]} instead of {id: [{"caption": ...}]}.

    Same jar (stanford-corenlp-3.4.1), same options (-preserveLines -lowerCase), same punctuation
    removal; the temp file lives in a private temp dir that is removed afterwards.
    """
    keys = [k for k, caps in captions.items() for _ in caps]
    lines = [_LINE_BREAKS.sub(" ", c) for caps in captions.values() for c in caps]
    jar = _toolkit_dir("tokenizer") / "stanford-corenlp-3.4.1.jar"
    if not jar.is_file():
        raise RuntimeError(f"PTB tokenizer jar not found at {jar}")
    with tempfile.TemporaryDirectory(prefix="cm3eval-ptb-") as tmp:
        (Path(tmp) / "captions.txt").write_bytes("\n".join(lines).encode())
        proc = _run_java(
            ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", "captions.txt"],
            cwd=tmp,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()[-500:]}")
    out = proc.stdout.decode().split("\n")
    # One output line per input line; a trailing newline may add one empty line, nothing else may differ.
    if len(out) < len(lines) or any(extra.strip() for extra in out[len(lines):]):
        raise RuntimeError(f"PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    tokenized: dict[Hashable, list[str]] = {k: [] for k in captions}
    for k, line in zip(keys, out):
        tokenized[k].append(" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS))
    return tokenized


def whitespace_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """nlg-eval's preprocessing (no PTB): keep case and punctuation, collapse whitespace to single spaces."""
    return {k: [" ".join(c.split()) for c in caps] for k, caps in captions.items()}


# --------------------------------------------------------------------------------------------
# METEOR: the toolkit's jar over a pipe
# --------------------------------------------------------------------------------------------


class MeteorJar:
    """pycocoevalcap's METEOR 1.5 process (same command line, same SCORE/EVAL protocol).

    Use as a context manager: the java process is always ended on exit (pycocoevalcap's Meteor only
    ends it in __del__). stderr goes to a temp file so a chatty jar can never block on a full pipe.
    """

    def __init__(self) -> None:
        folder = _toolkit_dir("meteor")
        self._stderr = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                ["java", "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"],
                cwd=folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            )
        except FileNotFoundError as e:
            self._stderr.close()
            raise RuntimeError("METEOR needs Java (a `java` on PATH)") from e

    def __enter__(self) -> MeteorJar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the jar exits at end of input
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._stderr.close()

    def __del__(self) -> None:  # a forgotten `with` still ends the process
        if getattr(self, "proc", None) is not None:
            self.close()

    def _ask(self, line: str, n_lines: int) -> list[str]:
        if "\n" in line:  # would desynchronise the line protocol
            raise ValueError("METEOR input may not contain newlines")
        try:
            self.proc.stdin.write((line + "\n").encode())
            self.proc.stdin.flush()
            answers = [self.proc.stdout.readline().decode().strip() for _ in range(n_lines)]
        except BrokenPipeError:
            answers = [""]
        if any(a == "" for a in answers):
            raise self._stopped()
        return answers

    def _stopped(self) -> RuntimeError:
        self._stderr.seek(0)
        return RuntimeError(f"METEOR jar stopped answering: {self._stderr.read().decode(errors='replace').strip()[-500:]}")

    @staticmethod
    def _score_line(hypothesis: str, references: Sequence[str]) -> str:
        # pycocoevalcap's sanitising of the hypothesis (references are passed as they are).
        hypothesis = hypothesis.replace("|||", "").replace("  ", " ")
        return " ||| ".join(("SCORE", " ||| ".join(references), hypothesis))

    def stats(self, hypothesis: str, references: Sequence[str]) -> str:
        return self._ask(self._score_line(hypothesis, references), 1)[0]

    def stats_many(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
        """`stats` for many (hypothesis, references) pairs, pipelined: a thread writes every SCORE
        line while this one reads the answers, so the jar never waits on a round trip (and neither
        side can block on a full pipe). Same lines, same order, same answers as one call each."""
        lines = [self._score_line(h, refs) for h, refs in pairs]
        if any("\n" in line for line in lines):  # would desynchronise the line protocol
            raise ValueError("METEOR input may not contain newlines")
        failed: list[BaseException] = []

        def write() -> None:
            try:
                for line in lines:
                    self.proc.stdin.write((line + "\n").encode())
                self.proc.stdin.flush()
            except OSError as e:  # the jar died; the reader below reports it
                failed.append(e)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        answers = [self.proc.stdout.readline().decode().strip() for _ in lines]
        writer.join()
        if failed or any(a == "" for a in answers):
            raise self._stopped()
        return answers

    def evaluate(self, stats: Sequence[str]) -> tuple[float, list[float]]:
        """Segment scores and the aggregate score for these statistics lines (pycocoevalcap's compute_score)."""
        answers = self._ask("EVAL ||| " + " ||| ".join(stats), len(stats) + 1)
        return float(answers[-1]), [float(a) for a in answers[:-1]]

    def aggregate(self, summed_stats: np.ndarray) -> float:
        """Score of one statistics vector: the jar sums per-segment statistics before scoring, so the
        aggregate of a set of images equals the score of their summed statistics."""
        return float(self._ask("EVAL ||| " + " ".join(repr(float(v)) for v in summed_stats), 2)[-1])


# --------------------------------------------------------------------------------------------
# Bootstrap of corpus statistics
# --------------------------------------------------------------------------------------------


def _resample_counts(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """How often each of n items is drawn in each bootstrap resample, as [chunk, n] count matrices."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, 4_000_000 // n))
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(rows, n))
        flat = (np.arange(rows)[:, None] * n + idx).ravel()
        yield np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def _percentile_ci(stats: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _corpus_bleu(comps: np.ndarray) -> np.ndarray:
    """pycocoevalcap's corpus BLEU-1..n from summed counts: comps [..., 2 + 2n] = testlen, reflen,
    guess_1..n, correct_1..n -> [..., n]. Same constants and order of operations as BleuScorer."""
    tiny, small = 1e-15, 1e-9
    n = (comps.shape[-1] - 2) // 2
    testlen, reflen = comps[..., 0], comps[..., 1]
    guess, correct = comps[..., 2:2 + n], comps[..., 2 + n:]
    prod = np.cumprod((correct + tiny) / (guess + small), axis=-1)
    bleus = prod ** (1.0 / np.arange(1, n + 1))
    ratio = (testlen + tiny) / (reflen + small)
    penalty = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1.0)), 1.0)
    return bleus * penalty[..., None]


# --------------------------------------------------------------------------------------------
# The metrics
# --------------------------------------------------------------------------------------------


def bleu_scorer(gts: dict, res: dict, ids: list):
    """pycocoevalcap's BleuScorer filled as its Bleu wrapper fills it."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=BLEU_N)
    for i in ids:
        scorer += (res[i][0], gts[i])
    return scorer


def bleu_counts(scorer) -> np.ndarray:
    """Per-image sufficient statistics [N, 2 + 2n] (testlen, "closest" reflen, guesses, correct n-grams),
    the numbers BleuScorer sums into corpus BLEU."""
    return np.array(
        [[c["testlen"], min((abs(r - c["testlen"]), r) for r in c["reflen"])[1], *c["guess"], *c["correct"]]
         for c in scorer.ctest],
        dtype=np.float64,
    )


def _bleu(gts: dict, res: dict, ids: list, seed: int) -> dict[str, MetricResult]:
    scorer = bleu_scorer(gts, res, ids)
    scores, per_image = scorer.compute_score(option="closest", verbose=0)  # what pycocoevalcap's Bleu does
    comps = bleu_counts(scorer)
    boot = np.concatenate([_corpus_bleu(w @ comps) for w in _resample_counts(len(ids), N_RESAMPLES, seed)])
    out = {}
    for k in range(BLEU_N):
        name = f"BLEU-{k + 1}"
        out[name] = MetricResult(name, float(scores[k]), _percentile_ci(boot[:, k]), len(ids),
                                 np.asarray(per_image[k], dtype=np.float64),
                                 {"corpus_level": True, "per_sample": "sentence BLEU"})
    return out


_prestarted: MeteorJar | None = None


def prestart_meteor() -> None:
    """Start the METEOR jar now, so its ~10 s of loading paraphrase tables overlaps the model's
    generation; the next METEOR computation takes it instead of starting its own."""
    global _prestarted
    if _prestarted is None or _prestarted.proc.poll() is not None:
        _prestarted = MeteorJar()


def _discard_prestarted() -> None:
    """At exit: an unused prestarted jar is killed (closing would wait for it to finish loading)."""
    global _prestarted
    jar, _prestarted = _prestarted, None
    if jar is not None:
        if jar.proc.poll() is None:
            jar.proc.kill()
            jar.proc.wait()
        jar.close()


atexit.register(_discard_prestarted)


def _take_meteor() -> MeteorJar:
    global _prestarted
    jar, _prestarted = _prestarted, None
    if jar is not None and jar.proc.poll() is None:
        return jar
    return MeteorJar()


def _meteor(gts: dict, res: dict, ids: list, seed: int) -> MetricResult:
    with _take_meteor() as jar:
        stats = jar.stats_many([(res[i][0], gts[i]) for i in ids])
        score, per_image = jar.evaluate(stats)
        vectors = np.array([[float(v) for v in s.split()] for s in stats], dtype=np.float64)
        extra = {"corpus_level": True, "per_sample": "segment METEOR"}
        # The CI rests on "aggregate = score of the summed statistics"; check it on the full set. Where the
        # jar disagrees (e.g. segments it cannot align), the score stands and the CI is left out, with the reason.
        gap = abs(jar.aggregate(vectors.sum(axis=0)) - score)
        if gap > 1e-6:
            extra["ci_unavailable"] = f"summed-statistics aggregate differs from the score by {gap:.3g}"
            ci = None
        else:
            boot = np.array([jar.aggregate(row) for w in _resample_counts(len(ids), N_RESAMPLES, seed)
                             for row in w @ vectors])
            ci = _percentile_ci(boot)
    return MetricResult("METEOR", score, ci, len(ids), np.asarray(per_image, dtype=np.float64), extra)


def spice_status() -> tuple[bool, str]:
    """Whether SPICE can run offline: its jar plus the Stanford CoreNLP 3.6.0 jars it would otherwise download."""
    folder = _toolkit_dir("spice")
    needed = [folder / "spice-1.0.jar", folder / "lib" / "stanford-corenlp-3.6.0.jar",
              folder / "lib" / "stanford-corenlp-3.6.0-models.jar"]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        return False, (f"not installed: {', '.join(missing)} missing in {folder} "
                       "(pycocoevalcap downloads Stanford CoreNLP 3.6.0 at first use; never done here)")
    return True, ""


def _spice(gts: dict, res: dict, ids: list, seed: int) -> MetricResult:
    available, reason = spice_status()
    if not available:
        return MetricResult("SPICE", float("nan"), None, 0, None, {"available": False, "reason": reason})
    folder = _toolkit_dir("spice")
    with tempfile.TemporaryDirectory(prefix="cm3eval-spice-") as tmp:
        inp, out = Path(tmp) / "input.json", Path(tmp) / "output.json"
        # Stringified ids: SPICE echoes image_id back and we key on it.
        inp.write_text(json.dumps([{"image_id": str(n), "test": res[i][0], "refs": gts[i]} for n, i in enumerate(ids)]))
        # pycocoevalcap's command minus -cache (its LMDB cache would live in the package folder).
        proc = _run_java(["java", "-jar", "-Xmx8G", "spice-1.0.jar", str(inp), "-out", str(out), "-subset", "-silent"],
                         cwd=folder)
        if proc.returncode != 0:
            reason = f"SPICE jar failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()[-300:]}"
            return MetricResult("SPICE", float("nan"), None, 0, None, {"available": False, "reason": reason})
        by_id = {item["image_id"]: item["scores"]["All"]["f"] for item in json.loads(out.read_text())}
    per_image = np.array([float("nan") if by_id.get(str(n)) is None else float(by_id[str(n)]) for n in range(len(ids))])
    if not np.all(np.isfinite(per_image)):
        bad = int((~np.isfinite(per_image)).sum())
        return MetricResult("SPICE", float("nan"), None, len(ids), per_image,
                            {"available": False, "reason": f"SPICE gave no score for {bad} images"})
    return mean_result("SPICE", per_image, seed=seed)


def _check_inputs(predictions: Mapping, references: Mapping) -> list:
    if not predictions:
        raise ValueError("caption metrics: no predictions")
    missing_refs = [i for i in predictions if i not in references]
    if missing_refs:
        raise ValueError(f"caption metrics: {len(missing_refs)} predicted ids have no references, e.g. {missing_refs[:5]}")
    missing_preds = [i for i in references if i not in predictions]
    if missing_preds:
        raise ValueError(f"caption metrics: {len(missing_preds)} reference ids have no prediction, e.g. {missing_preds[:5]}")
    empty = [i for i, refs in references.items() if isinstance(refs, str) or len(refs) == 0]
    if empty:
        raise ValueError(f"caption metrics: ids with an empty (or non-list) reference list, e.g. {empty[:5]}")
    bad = [i for i, p in predictions.items() if not isinstance(p, str)]
    bad += [i for i, refs in references.items() if not all(isinstance(r, str) for r in refs)]
    if bad:
        raise TypeError(f"caption metrics: captions must be strings; not so for ids {bad[:5]}")
    return list(predictions)


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    tokenize: Tokenize = "ptb",
    spice: bool | None = None,
    seed: int = 0,
) -> dict[str, MetricResult]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D), SPICE for one caption per image.

    predictions: {image_id: caption}; references: {image_id: [caption, ...]} with exactly the same ids.
    tokenize: "ptb" (COCO: Stanford PTB tokenizer, lower-case, punctuation removed) or "none"
      (nlg-eval: whitespace split only; case and punctuation kept).
    spice: None = run when installed, else report unavailable; False = leave it out; True = as None
      (it is never downloaded).
    Returns {name: MetricResult}; names in METRIC_NAMES. See the module docstring for scales, CIs
    and the idf caveat of CIDEr.
    """
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = _check_inputs(predictions, references)
    if tokenize == "ptb":
        tok = ptb_tokenize
    elif tokenize == "none":
        tok = whitespace_tokenize
    else:
        raise ValueError(f"tokenize must be 'ptb' or 'none', got {tokenize!r}")
    # pycocoevalcap tokenizes references and results in two separate calls, in this order.
    gts = tok({i: list(references[i]) for i in ids})
    res = tok({i: [predictions[i]] for i in ids})

    results = _bleu(gts, res, ids, seed)
    results["METEOR"] = _meteor(gts, res, ids, seed)
    rouge_value, rouge_scores = Rouge().compute_score(gts, res)
    results["ROUGE-L"] = mean_result("ROUGE-L", rouge_scores, seed=seed)
    cider_value, cider_scores = Cider().compute_score(gts, res)
    results["CIDEr"] = mean_result("CIDEr", cider_scores, seed=seed, variant="CIDEr-D", idf_over=len(ids))
    # mean_result recomputes the mean; keep the toolkit's own number (identical in practice).
    results["ROUGE-L"].value, results["CIDEr"].value = float(rouge_value), float(cider_value)
    if spice is not False:
        results["SPICE"] = _spice(gts, res, ids, seed)
    for r in results.values():
        r.extra.setdefault("tokenize", tokenize)
    return results


# --------------------------------------------------------------------------------------------
# Official COCO file formats
# --------------------------------------------------------------------------------------------


def load_coco_caption_files(results_path: str | Path, annotations_path: str | Path) -> tuple[dict, dict, int]:
    """COCO results JSON [{"image_id", "caption"}] + COCO captions annotations JSON ->
    (predictions, references restricted to the result image ids, number of images in the annotations).

    Only the images present in the results are scored (CIDEr's idf then covers those images only).
    """
    predictions = read_results(results_path, "image_id", "caption", duplicate="has more than one caption")
    ann = read_json(annotations_path)
    if not isinstance(ann, dict) or not isinstance(ann.get("annotations"), list):
        raise ValueError(f"{annotations_path}: expected a COCO captions file with an 'annotations' list")
    all_refs: dict = defaultdict(list)
    for n, a in enumerate(ann["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise ValueError(f"{annotations_path}: annotation {n} lacks an 'image_id' or a string 'caption'")
        all_refs[a["image_id"]].append(a["caption"])
    unknown = [i for i in predictions if i not in all_refs]
    if unknown:
        raise ValueError(f"{results_path}: {len(unknown)} image ids are not in {annotations_path}, e.g. {unknown[:5]}")
    return predictions, {i: all_refs[i] for i in predictions}, len(all_refs)
