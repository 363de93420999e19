"""`cm3eval score vqa|caption`: score result files in the official VQAv2 / COCO-caption formats.

`vqa RESULTS.json --questions Q.json --annotations A.json`: official VQA accuracy; like the official
script, every annotated question must be answered.
`caption RESULTS.json --annotations captions.json`: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D), SPICE when
installed; only the images present in RESULTS are scored (CIDEr's idf then covers those images).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from evals.metrics.result import MetricResult


def _finite(x: Any) -> Any:
    """JSON has no NaN: a metric that could not be computed (SPICE unavailable) prints null."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _as_json(results: dict[str, MetricResult]) -> str:
    out = {}
    for name, r in results.items():
        d = r.to_json()
        d["value"] = _finite(d["value"])
        out[name] = d
    return json.dumps(out)


def _table(title: str, results: dict[str, MetricResult], notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("metric", "value", "95% CI", "n"):
        table.add_column(col)
    for name, r in results.items():
        if not math.isfinite(r.value):
            table.add_row(name, "unavailable", r.extra.get("reason", ""), "")
            continue
        ci = f"[{r.ci[0]:.4f}, {r.ci[1]:.4f}]" if r.ci else "-"
        table.add_row(name, f"{r.value:.4f}", ci, str(r.n))
    console = Console()
    console.print(table)
    for note in notes:
        console.print(note)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2) from None


def vqa(
    results: Annotated[Path, typer.Argument(help="Official results JSON: [{\"question_id\", \"answer\"}].")],
    questions: Annotated[Path, typer.Option("--questions", help="Official questions JSON.")],
    annotations: Annotated[Path, typer.Option("--annotations", help="Official annotations JSON.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object {metric: {value, ci, n}}.")] = False,
) -> None:
    """Official VQA accuracy (VQAv2 rule; also VizWiz / OK-VQA files in the same layout)."""
    from evals.metrics.vqa import load_vqa_files, vqa_accuracy

    try:
        predictions, anns = load_vqa_files(results, questions, annotations)
        result = vqa_accuracy(predictions, anns)
    except (ValueError, TypeError, FileNotFoundError) as e:
        _fail(e)
    metrics = {"vqa_accuracy": result}
    for answer_type, d in result.extra.get("per_answer_type", {}).items():
        # Per-answer-type rows for humans; the JSON keeps them inside vqa_accuracy's "extra".
        metrics[f"  {answer_type}"] = MetricResult(str(answer_type), d["value"], None, d["n"])
    if json_out:
        typer.echo(_as_json({"vqa_accuracy": result}))
    else:
        _table("VQA accuracy (official rule, 0-100)", metrics, [f"{result.n} questions scored"])


def caption(
    results: Annotated[Path, typer.Argument(help="COCO results JSON: [{\"image_id\", \"caption\"}].")],
    annotations: Annotated[Path, typer.Option("--annotations", help="COCO captions annotations JSON.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object {metric: {value, ci, n}}.")] = False,
    tokenize: Annotated[str, typer.Option("--tokenize", help="ptb (COCO toolkit) or none (whitespace only, as nlg-eval).")] = "ptb",
) -> None:
    """COCO caption metrics of the result images (pycocoevalcap numbers, raw scale: CIDEr 1.0 = 100)."""
    from evals.metrics.captioning import caption_metrics, load_coco_caption_files

    if tokenize not in ("ptb", "none"):
        _fail(ValueError(f"--tokenize must be 'ptb' or 'none', got {tokenize!r}"))
    try:
        predictions, references, n_annotated = load_coco_caption_files(results, annotations)
        metrics = caption_metrics(predictions, references, tokenize=tokenize)  # type: ignore[arg-type]
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        _fail(e)
    if json_out:
        typer.echo(_as_json(metrics))
    else:
        note = (f"scored the {len(predictions)} images in {results} (of {n_annotated} in the annotations); "
                "CIDEr's idf is computed over these images only")
        _table("COCO caption metrics (pycocoevalcap scale)", metrics, [note])
