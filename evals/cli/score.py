"""`cm3eval score vqa|caption|fid|edit`: score result files in the official formats.

- `vqa RESULTS.json --questions Q.json --annotations A.json [--legacy]`: official VQA accuracy
  (the current official loop; `--legacy` for the pre-2021 one); like the official script, every
  annotated question must be answered.
- `caption RESULTS.json --annotations captions.json`: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D), SPICE
  when installed; only the images present in RESULTS are scored (CIDEr's idf then covers those).
- `fid GEN_DIR (REF_DIR | --ref-stats FILE.npz)`: FID of a folder of generated images; reference
  folders go through `reference_stats`, so their statistics are cached on disk.
- `edit --generated DIR --target DIR [--source DIR --captions FILE --encoder SPEC]`: the run's
  edit metrics (`evals.scoring.EDIT_METRICS`) on folders of images.
- `images GEN_DIR REF_DIR [--metrics fid,cmmd,fd_dinov2,prdc]`: the image-set metrics of a t2i task
  (the same adapters as a run) on two folders, e.g. a run's saved images against the references;
  exit 3 when a requested metric could not be computed (its reason printed).
Every command has `--json`; every metric carries `higher_is_better` from the metric table.
Heavy imports (torch, numpy, the metrics) happen inside the commands: `cm3eval --help` stays fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cm3leon.errors import Cm3evalError
from evals.errors import OneLineErrors, exit_with

score_app = typer.Typer(cls=OneLineErrors, help="Score result files in the official formats.", no_args_is_help=True)

_PROTOCOLS = "pytorch-fid, torch-fidelity, clean"  # evals.metrics.fid_resize.PROTOCOLS (not imported: start-up)


_fail = exit_with  # a library's ValueError on a result file is bad input: one line, exit 2


def _directed(results: dict[str, Any], key: str) -> dict[str, Any]:
    """Set each result's direction from metric `key`'s definition in the table."""
    from evals.scoring import higher_is_better

    for name, r in results.items():
        r.higher_is_better = higher_is_better(name, key)
    return results


def _as_json(results: dict[str, Any]) -> str:
    return json.dumps({name: r.to_json() for name, r in results.items()})


def _table(title: str, results: dict[str, Any], notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("metric", "value", "95% CI", "n", "better"):
        table.add_column(col)
    for name, r in results.items():
        better = {True: "higher", False: "lower"}.get(r.higher_is_better, "")
        if not math.isfinite(r.value):
            table.add_row(name, "unavailable", r.extra.get("reason", ""), "", better)
            continue
        ci = f"[{r.ci[0]:.4f}, {r.ci[1]:.4f}]" if r.ci else "-"
        table.add_row(name, f"{r.value:.4f}", ci, str(r.n), better)
    console = Console()
    console.print(table)
    for note in notes:
        console.print(note)


@score_app.command("vqa")
def vqa(
    results: Annotated[Path, typer.Argument(help="Official results JSON: [{\"question_id\", \"answer\"}].")],
    questions: Annotated[Path, typer.Option("--questions", help="Official questions JSON.")],
    annotations: Annotated[Path, typer.Option("--annotations", help="Official annotations JSON.")],
    legacy: Annotated[bool, typer.Option("--legacy", help="The pre-2021 official loop (evaluation "
                                         "'legacy-2017'), for comparing with older papers.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object {metric: {value, ci, n}}.")] = False,
) -> None:
    """Official VQA accuracy (VQAv2 rule; also VizWiz / OK-VQA files in the same layout)."""
    from evals.metrics.result import MetricResult
    from evals.metrics.vqa import load_vqa_files, vqa_accuracy

    evaluation = "legacy-2017" if legacy else "current"
    try:
        predictions, anns = load_vqa_files(results, questions, annotations)
        result = vqa_accuracy(predictions, anns, evaluation=evaluation)
    except (Cm3evalError, ValueError, TypeError, FileNotFoundError) as e:
        _fail(e)
    result.higher_is_better = True
    if json_out:
        typer.echo(_as_json({"vqa_accuracy": result}))
        return
    metrics = {"vqa_accuracy": result}
    for answer_type, d in result.extra.get("per_answer_type", {}).items():
        # Per-answer-type rows for humans; the JSON keeps them inside vqa_accuracy's "extra".
        metrics[f"  {answer_type}"] = MetricResult(str(answer_type), d["value"], None, d["n"], higher_is_better=True)
    _table(f"VQA accuracy (official rule, evaluation {evaluation}, 0-100)", metrics,
           [f"{result.n} questions scored; {result.extra['evaluation_source']}"])


@score_app.command("caption")
def caption(
    results: Annotated[Path, typer.Argument(help="COCO results JSON: [{\"image_id\", \"caption\"}].")],
    annotations: Annotated[Path, typer.Option("--annotations", help="COCO captions annotations JSON.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object {metric: {value, ci, n}}.")] = False,
    tokenize: Annotated[str, typer.Option("--tokenize", help="ptb (COCO toolkit) or none (whitespace only, "
                                          "as nlg-eval).")] = "ptb",
) -> None:
    """COCO caption metrics of the result images (pycocoevalcap numbers, raw scale: CIDEr 1.0 = 100)."""
    if tokenize not in ("ptb", "none"):
        _fail(ValueError(f"--tokenize must be 'ptb' or 'none', got {tokenize!r}"))
    from evals.metrics.captioning import caption_metrics, load_coco_caption_files

    try:
        predictions, references, n_annotated = load_coco_caption_files(results, annotations)
        metrics = caption_metrics(predictions, references, tokenize=tokenize)  # type: ignore[arg-type]
    except (Cm3evalError, ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        _fail(e)
    _directed(metrics, "captioning")
    if json_out:
        typer.echo(_as_json(metrics))
        return
    note = (f"scored the {len(predictions)} images in {results} (of {n_annotated} in the annotations); "
            "CIDEr's idf is computed over these images only")
    _table("COCO caption metrics (pycocoevalcap scale)", metrics, [note])


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@score_app.command("fid")
def fid(
    gen_dir: Annotated[Path, typer.Argument(help="Folder of generated images (any sizes; resized per protocol).")],
    ref_dir: Annotated[Optional[Path], typer.Argument(help="Folder of reference images.")] = None,
    ref_stats: Annotated[Optional[Path], typer.Option("--ref-stats", help="Reference statistics .npz instead "
                                                      "of REF_DIR.")] = None,
    protocol: Annotated[str, typer.Option(help=f"Preprocessing: {_PROTOCOLS}.")] = "pytorch-fid",
    weights: Annotated[Optional[Path], typer.Option(help="pt_inception-2015-12-05-6726825d.pth; with --protocol "
                                                    "clean, clean-fid's inception-2015-12-05.pt (else the weights "
                                                    "finder: its variable, the cache, the torch hub cache).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 50,
    kid: Annotated[bool, typer.Option("--kid", help="Also report KID (needs reference features: REF_DIR or a "
                                      "stats file that has them).")] = False,
    kid_subset_size: Annotated[int, typer.Option("--kid-subset-size", min=2)] = 1000,
    kid_subsets: Annotated[int, typer.Option("--kid-subsets", min=1)] = 100,
    resolution: Annotated[Optional[int], typer.Option(help="Resize+center-crop the reference images to this "
                                                      "square size first.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Reference statistics cache (default "
                                                      "$CM3EVAL_CACHE/fid-stats).")] = None,
    save_ref_stats: Annotated[Optional[Path], typer.Option("--save-ref-stats", help="Also write the reference "
                                                           "statistics to this .npz.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for a 95% CI (expensive: ~1 s each at "
                                           "2048-d); 0 = off.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """FID between generated images and a reference set (pytorch-fid protocol by default, as CM3leon)."""
    if (ref_dir is None) == (ref_stats is None):
        raise typer.BadParameter("give exactly one of REF_DIR or --ref-stats")
    from evals.metrics.fid import compute_fid, inception_extractor, reference_stats

    try:
        extractor = inception_extractor(weights, _device(device), protocol)
        if ref_dir is not None:
            ref: Any = reference_stats(ref_dir, cache_dir, protocol=protocol, resolution=resolution,
                                       feature_extractor=extractor, batch_size=batch_size, keep_features=kid)
            if save_ref_stats is not None:
                ref.save(save_ref_stats)
        else:
            ref = ref_stats
        result = compute_fid(gen_dir, ref, protocol=protocol, feature_extractor=extractor, batch_size=batch_size,
                             kid_subsets=kid_subsets if kid else None, kid_subset_size=kid_subset_size,
                             bootstrap=bootstrap)
    except (Cm3evalError, ValueError, FileNotFoundError, TypeError) as e:
        _fail(e)
    _directed({result.name: result}, "fid")
    if json_out:
        typer.echo(json.dumps({"name": result.name, **result.to_json()}))
        return
    ci = f" (95% CI {result.ci[0]:.4f}..{result.ci[1]:.4f})" if result.ci else ""
    typer.echo(f"{result.name}: {result.value:.4f}{ci}  n={result.n} ref n={result.extra['n_ref']} "
               f"protocol={protocol}  (lower is better)")
    if "kid" in result.extra:
        k = result.extra["kid"]
        typer.echo(f"KID: {k['mean']:.6f} ± {k['std']:.6f}  ({k['subsets']} subsets of {k['subset_size']})")


def _load_dino(weights: Path | None) -> tuple[Any, str | None]:
    """(DinoEncoder or None, reason it was skipped). An explicit --dino-weights that fails is an error."""
    from evals.edit_folders import EditScoreError
    from evals.metrics.dino import DinoEncoder, DinoWeightsNotFound

    try:
        return DinoEncoder.load(weights), None
    except DinoWeightsNotFound as e:
        if weights is not None:
            raise EditScoreError(str(e)) from None
        return None, f"weights not present: {e}"
    except ValueError as e:
        raise EditScoreError(str(e)) from None


def _load_encoder(spec: str) -> Any:
    from evals.edit_folders import EditScoreError
    from evals.encoders import EncoderUnavailable, resolve_encoder

    try:
        return resolve_encoder(spec, flag="--encoder")
    except EncoderUnavailable as e:
        raise EditScoreError(f"--encoder {spec!r}: {e.reason}") from None


def _print_edit(metrics: dict[str, Any], skipped: dict[str, str], n: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "value", "95% CI", "n", "better", title=f"edit scores ({n} samples)")
    for name, m in metrics.items():
        ci = f"[{m.ci[0]:.4f}, {m.ci[1]:.4f}]" if m.ci is not None else "-"
        table.add_row(name, f"{m.value:.4f}", ci, str(m.n), {True: "higher", False: "lower"}.get(m.higher_is_better, ""))
    con = Console()
    con.print(table)
    for name, reason in skipped.items():
        con.print(f"skipped {name}: {reason}")


@score_app.command("edit")
def edit(
    generated: Path = typer.Option(..., "--generated", help="folder of generated (edited) images, named like the targets"),
    target: Path = typer.Option(..., "--target", help="folder of ground-truth edited images"),
    source: Optional[Path] = typer.Option(None, "--source", help="folder of input images, named like the targets"),
    captions: Optional[Path] = typer.Option(None, "--captions", help="JSON captions (target, or {source, target})"),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="encoder: open_clip:ARCH:PATH, hf-clip:DIR (or an "
                                          "HF CLIP folder), native:PATH, demo"),
    dino_weights: Optional[Path] = typer.Option(None, "--dino-weights", help="dino_deitsmall16_pretrain.pth"),
    seed: int = typer.Option(0, help="bootstrap seed"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """MagicBrush / InstructPix2Pix editing metrics: L1, L2 (MSE), CLIP-I, CLIP-T, CLIP-dir, CLIP-img, DINO."""
    from evals.edit_folders import load_captions, score_edit_folders

    try:
        caps = load_captions(captions) if captions is not None else None
        enc = _load_encoder(encoder) if encoder is not None else None
        dino, dino_reason = _load_dino(dino_weights)
        metrics, skipped, n = score_edit_folders(target, generated, source, captions=caps, encoder=enc, dino=dino,
                                                 seed=seed)
    except Cm3evalError as e:
        _fail(e)
    if dino_reason is not None:
        skipped["DINO"] = dino_reason
    if as_json:
        typer.echo(json.dumps({"n_samples": n, "metrics": {k: m.to_json() for k, m in metrics.items()},
                               "skipped": skipped, "encoder": encoder}))
        return
    _print_edit(metrics, skipped, n)


_IMAGE_METRICS = "fid,cmmd,fd_dinov2,prdc"


@score_app.command("images")
def images(
    gen_dir: Annotated[Path, typer.Argument(help="Folder of generated images (e.g. a run task's images/).")],
    ref_dir: Annotated[Path, typer.Argument(help="Folder of reference images.")],
    metrics: Annotated[str, typer.Option(help="Comma-separated metric keys of the metric table.")] = _IMAGE_METRICS,
    weights: Annotated[Optional[Path], typer.Option(help="FID Inception weights (else the weights finder).")] = None,
    protocol: Annotated[str, typer.Option(help=f"FID preprocessing: {_PROTOCOLS}.")] = "pytorch-fid",
    dinov2_weights: Annotated[Optional[Path], typer.Option("--dinov2-weights", help="dinov2_vit?14_pretrain.pth "
                                                           "(else the weights finder).")] = None,
    dinov2_arch: Annotated[str, typer.Option("--dinov2-arch", help="vitl14 (FD-DINOv2), vitb14 or vits14.")] = "vitl14",
    cmmd_encoder: Annotated[str, typer.Option("--cmmd-encoder", help="CMMD's CLIP: clip-vit-l-14-336, "
                                              "open_clip:ARCH:PATH or an HF CLIP folder.")] = "clip-vit-l-14-336",
    prdc_space: Annotated[str, typer.Option("--prdc-space", help="PRDC features: inception, dinov2 or an encoder "
                                            "name.")] = "inception",
    nearest_k: Annotated[int, typer.Option("--nearest-k", min=1)] = 5,
    resolution: Annotated[Optional[int], typer.Option(help="Resize+center-crop both sets to this square first.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the CIs (FID/FD: ~1 s each at 2048-d "
                                           "when N > D).")] = 100,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """FID, CMMD, FD-DINOv2 and precision/recall/density/coverage of two image folders, with CIs."""
    from evals.image_scoring import FolderContext
    from evals.scoring import METRICS, score_metrics

    keys = [k.strip() for k in metrics.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METRICS or "t2i" not in METRICS[k].kinds]
    if unknown or not keys:
        raise typer.BadParameter(f"unknown image metric(s) {unknown}; choose from fid, cmmd, fd_dinov2, prdc")
    common = {"resolution": resolution, "bootstrap": bootstrap}
    opts = {"fid": {**common, "weights": weights, "protocol": protocol},
            "cmmd": {**common, "encoder": cmmd_encoder},
            "fd_dinov2": {**common, "weights": dinov2_weights, "arch": dinov2_arch},
            "prdc": {"resolution": resolution, "nearest_k": nearest_k, "feature_space": prdc_space, "arch": dinov2_arch,
                     "weights": dinov2_weights if prdc_space == "dinov2" else weights}}
    try:
        ctx = FolderContext(gen_dir, ref_dir, device=_device(device), seed=seed)
        scored = score_metrics({k: opts[k] for k in keys}, ctx, label="score images")
    except (Cm3evalError, ValueError, FileNotFoundError, TypeError) as e:
        _fail(e)
    if json_out:
        typer.echo(json.dumps({"metrics": {k: r.to_json() for k, r in scored.metrics.items()},
                               "not_computed": scored.unavailable, "n_generated": len(ctx.generated),
                               "n_reference": len(ctx.reference)}))
    else:
        _table(f"image metrics ({len(ctx.generated)} generated vs {len(ctx.reference)} reference)", scored.metrics,
               scored.notes)
    if scored.unavailable:
        raise typer.Exit(3)
