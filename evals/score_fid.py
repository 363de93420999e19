"""`cm3eval score fid GEN_DIR (REF_DIR | --ref-stats FILE.npz)`: FID of a folder of generated images.

Reference folders go through `reference_stats`, so their statistics are cached on disk (keyed by
the image set, resolution, protocol and network). `--ref-stats` takes our .npz (from a cache or
`--save-ref-stats`) or a pytorch-fid `--save-stats` file (mu/sigma; no KID possible then).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from evals.metrics.fid import PROTOCOLS, compute_fid, inception_extractor, reference_stats


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def fid(
    gen_dir: Annotated[Path, typer.Argument(help="Folder of generated images (any sizes; resized per protocol).")],
    ref_dir: Annotated[Optional[Path], typer.Argument(help="Folder of reference images.")] = None,
    ref_stats: Annotated[Optional[Path], typer.Option("--ref-stats", help="Reference statistics .npz instead of REF_DIR.")] = None,
    protocol: Annotated[str, typer.Option(help=f"Preprocessing: {', '.join(PROTOCOLS)}.")] = "pytorch-fid",
    weights: Annotated[Optional[Path], typer.Option(help="pt_inception-2015-12-05-6726825d.pth (else $CM3EVAL_INCEPTION_WEIGHTS, then the torch hub cache).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 50,
    kid: Annotated[bool, typer.Option("--kid", help="Also report KID (needs reference features: REF_DIR or a stats file that has them).")] = False,
    kid_subset_size: Annotated[int, typer.Option("--kid-subset-size", min=2)] = 1000,
    kid_subsets: Annotated[int, typer.Option("--kid-subsets", min=1)] = 100,
    resolution: Annotated[Optional[int], typer.Option(help="Resize+center-crop the reference images to this square size first.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Reference statistics cache (default ~/.cache/cm3eval/fid-stats).")] = None,
    save_ref_stats: Annotated[Optional[Path], typer.Option("--save-ref-stats", help="Also write the reference statistics to this .npz.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for a 95% CI (expensive: ~1 s each at 2048-d); 0 = off.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """FID between generated images and a reference set (pytorch-fid protocol by default, as CM3leon)."""
    if (ref_dir is None) == (ref_stats is None):
        raise typer.BadParameter("give exactly one of REF_DIR or --ref-stats")
    try:
        extractor = inception_extractor(weights, _device(device))
        if ref_dir is not None:
            ref = reference_stats(ref_dir, cache_dir, protocol=protocol, resolution=resolution,
                                  feature_extractor=extractor, batch_size=batch_size, keep_features=kid)
            if save_ref_stats is not None:
                ref.save(save_ref_stats)
        else:
            ref = ref_stats
        result = compute_fid(gen_dir, ref, protocol=protocol, feature_extractor=extractor, batch_size=batch_size,
                             kid_subsets=kid_subsets if kid else None, kid_subset_size=kid_subset_size,
                             bootstrap=bootstrap)
    except (ValueError, FileNotFoundError, TypeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if json_out:
        typer.echo(json.dumps({"name": result.name, **result.to_json()}))
        return
    ci = f" (95% CI {result.ci[0]:.4f}..{result.ci[1]:.4f})" if result.ci else ""
    typer.echo(f"{result.name}: {result.value:.4f}{ci}  n={result.n} ref n={result.extra['n_ref']} "
               f"protocol={protocol}")
    if "kid" in result.extra:
        k = result.extra["kid"]
        typer.echo(f"KID: {k['mean']:.6f} ± {k['std']:.6f}  ({k['subsets']} subsets of {k['subset_size']})")
