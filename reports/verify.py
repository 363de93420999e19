"""Every number a view reads from metrics.json, checked against the run's samples.

`verify_task(run_dir, task, entry, samples)` is the one check (compare and the leaderboard call
it); it returns how each metric was verified and raises InconsistentRun (exit 2, one line naming
the file and the metric) when a value disagrees with what it was computed from, or when nothing
in the run can confirm it. How a metric is checked, in order:

- a mean of per-sample scores (accuracy, CIDEr, CLIPScore, L1, R@k, ...): the value equals
  scale x mean of the finished samples' scores (scale 1, or 100 for a percentage; 2-decimal
  rounding allowed on the x100 scale) over `n` of them;
- a set metric (FID, FID/<category>, FD-<encoder>, CMMD, PRDC's recall and coverage): recomputed
  from the feature rows the run saved (TASK/features/METRIC.npz, PRDC.npz for both PRDC values), to
  1e-6 relative;
- a corpus captioning metric (BLEU-n, METEOR): recomputed from the samples' predictions and
  references with the task's captioning options (pycocoevalcap, as the run computed them).
Anything else is refused: a number nothing in the run folder supports is not shown as a result.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from evals import runs
from reports.errors import InconsistentRun
from reports.format import finite, fmt
from reports.persample import mean_scale, per_sample
from reports.rundata import load_task_config

CAPTION_CORPUS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR")
SET_TOLERANCE = 1e-6


def _where(run_dir: Path, task: str, metric: str) -> str:
    return f"{Path(run_dir) / runs.METRICS}: {task}/{metric}"


def _check_mean(run_dir: Path, task: str, metric: str, entry: dict[str, Any], per: dict[str, float]) -> bool:
    if mean_scale(entry, per) is None:
        return False
    n = entry.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n != len(per):
        raise InconsistentRun(f"{_where(run_dir, task, metric)} records n={n} but the samples hold {len(per)} "
                              "per-sample scores; the run's files disagree")
    return True


def _recomputed(metric: str, saved: dict[str, Any], extra: dict[str, Any]) -> float | None:
    """The set metric from its saved rows, by the metric's own code (None: no rule for it)."""
    if "ref_mu" in saved:  # a Fréchet distance against the reference moments
        from reports.paired import set_value

        return set_value(metric, saved)
    if metric == "CMMD":
        from evals.metrics.cmmd import cmmd_from_embeddings

        return cmmd_from_embeddings(saved["features"], saved["ref_features"]).value
    if metric in ("recall", "coverage") and isinstance(extra.get("nearest_k"), int):
        from evals.metrics.prdc import prdc_per_sample

        return float(prdc_per_sample(saved["ref_features"], saved["features"], extra["nearest_k"])[metric].mean())
    return None


def _check_set(run_dir: Path, task: str, metric: str, value: float, extra: dict[str, Any]) -> bool:
    try:
        saved = runs.read_features(Path(run_dir) / task, str(extra.get("features_file") or metric))
    except runs.RunFolderError as e:
        raise InconsistentRun(str(e)) from None
    if saved is None:
        return False
    got = _recomputed(metric, saved, extra)
    if got is None:
        return False
    if not math.isclose(got, value, rel_tol=SET_TOLERANCE, abs_tol=1e-12):
        raise InconsistentRun(f"{_where(run_dir, task, metric)} is {fmt(value)} but its saved features give "
                              f"{fmt(got)}; the run's files disagree")
    return True


def _caption_values(run_dir: Path, task: str, samples: list[dict[str, Any]], names: set[str]) -> dict[str, float]:
    """BLEU-n (and METEOR when asked: it starts the METEOR jar) of the samples' predictions, tokenized
    with the run's captioning option, as evals.metrics.captioning computes them."""
    from evals.metrics import captioning as cap

    ok = [s for s in samples if not s.get("failure") and isinstance(s.get("prediction"), str)]
    if not ok:
        return {}
    opts = ((load_task_config(run_dir, task) or {}).get("task", {}).get("metrics") or {}).get("captioning") or {}
    tokenize = opts.get("tokenize", "ptb")
    preds, refs = {s["id"]: s["prediction"] for s in ok}, {s["id"]: list(s["references"]) for s in ok}
    if "METEOR" in names:
        return {k: r.value for k, r in cap.caption_metrics(preds, refs, tokenize=tokenize, spice=False).items()}
    tok = cap.ptb_tokenize if tokenize == "ptb" else cap.whitespace_tokenize
    ids = list(preds)
    gts, res = tok({i: refs[i] for i in ids}), tok({i: [preds[i]] for i in ids})
    scores, _ = cap.bleu_scorer(gts, res, ids).compute_score(option="closest", verbose=0)
    return {f"BLEU-{k + 1}": float(v) for k, v in enumerate(scores)}


def verify_task(run_dir: Path | str, task: str, entry: dict[str, Any], samples: list[dict[str, Any]]
                ) -> dict[str, str]:
    """{metric: "mean" | "features" | "recomputed" | "no value"} for every metric of a task entry of
    metrics.json; raises InconsistentRun on the first metric that disagrees or cannot be verified."""
    run_dir = Path(run_dir)
    how: dict[str, str] = {}
    captions: dict[str, float] | None = None
    for metric, m in (entry.get("metrics") or {}).items():
        value = finite(m.get("value"))
        if value is None:
            how[metric] = "no value"
            continue
        corpus = bool((m.get("extra") or {}).get("corpus_level"))
        if not corpus and _check_mean(run_dir, task, metric, m, per_sample(samples, metric)):
            how[metric] = "mean"
        elif _check_set(run_dir, task, metric, value, m.get("extra") or {}):
            how[metric] = "features"
        elif metric in CAPTION_CORPUS:
            if captions is None:
                captions = _caption_values(run_dir, task, samples, set(entry.get("metrics") or {}))
            got = captions.get(metric)
            if got is None or not math.isclose(got, value, rel_tol=1e-9, abs_tol=1e-12):
                raise InconsistentRun(f"{_where(run_dir, task, metric)} is {fmt(value)} but the samples' predictions "
                                      f"score {fmt(got)}; the run's files disagree")
            how[metric] = "recomputed"
        else:
            per = per_sample(samples, metric)
            why = (f"its {len(per)} per-sample scores average to {fmt(math.fsum(per.values()) / len(per))}"
                   if per else "no per-sample scores, saved features or predictions to recompute it from")
            raise InconsistentRun(f"{_where(run_dir, task, metric)} is {fmt(value)} but {why}; the run's files "
                                  "disagree (or it was edited by hand)")
    return how


def verify_run(run_dir: Path | str, metrics: dict[str, Any] | None = None) -> dict[str, dict[str, str]]:
    """verify_task for every task of a finished run (metrics: its metrics.json, when already read)."""
    from reports.rundata import load_metrics, load_samples

    data = metrics if metrics is not None else load_metrics(run_dir)
    return {task: verify_task(run_dir, task, entry, load_samples(run_dir, task))
            for task, entry in data["tasks"].items()}
