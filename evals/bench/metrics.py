"""`cm3eval bench metrics`: metric speed, side by side with straightforward reference implementations.

VQA accuracy: the vectorised `vqa_accuracy` against `vqa_accuracy_reference` (the official loop,
line by line) on synthetic VQAv2-style questions whose answers carry the noise the official
normalisation exists for (case, punctuation, articles, number words, contractions, digit commas),
with a mix of unanimous and disagreeing answer sets, for the current official loop (default) or
the pre-2021 one (`--legacy`). The two must agree exactly; the command fails otherwise. Fréchet distance at d=2048 comes from `evals.bench.fid.run_fid_bench()`.
Metric networks (`evals.bench.networks`): each network's feature extraction throughput beside a
plain forward of the same network on ready tensors.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

# numpy and the metric modules are imported inside the functions: `cm3eval --help` mounts `command`.

_COLORS = ["red", "blue", "white", "black", "green", "yellow", "brown", "gray", "orange", "pink", "purple", "silver"]
_OBJECTS = ["dog", "cat", "apple", "tennis racket", "frisbee", "t-shirt", "hot dog", "baseball bat", "skateboard",
            "umbrella", "pizza", "surfboard", "kite", "giraffe", "elephant", "bus", "train", "clock", "laptop", "horse",
            "banana", "sandwich", "toilet", "sink", "bench", "bird", "zebra", "truck", "boat", "motorcycle"]
_PLACES = ["table", "sky", "street", "beach", "kitchen", "field", "water", "snow", "grass", "wall"]
_PHRASES = ["don't know", "dont know", "cant tell", "im not sure", "it's raining", "playing tennis", "sitting",
            "12:30", "3 o'clock", "oclock", "mcdonald's", "st. louis", "u.s.", "dr. pepper", "yes, it is",
            "(unknown)", "50%", "#1", "left side", "wooden", "whats that", "youre welcome", "2,000", "1.5", "3.14",
            "1,000,000", "$5", "a/c", "e-mail", "[none]", "n/a", "he's running", "they're eating", "1:00 pm"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_QTYPES = {"yes/no": ["is the", "are there", "is this", "does the", "can you"],
           "number": ["how many", "how many people are", "what number is"],
           "other": ["what color is the", "what is the", "where is the", "what sport is", "what is on the", "why"]}


def _base_answers() -> list[tuple[str, str]]:
    """(answer, answer_type) pairs."""
    out = [("yes", "yes/no"), ("no", "yes/no")]
    out += [(str(i), "number") for i in range(21)] + [(w, "number") for w in _NUMBER_WORDS] + [("none", "number")]
    out += [(c, "other") for c in _COLORS] + [("black and white", "other")]
    out += [(f"{art}{o}", "other") for o in _OBJECTS for art in ("", "a ", "the ")]
    out += [(f"{c} {o}", "other") for c in _COLORS[:6] for o in _OBJECTS]
    out += [(f"on the {p}", "other") for p in _PLACES] + [(f"in {p}", "other") for p in _PLACES]
    out += [(p, "other") for p in _PHRASES]
    return out


def _variants(answer: str) -> list[str]:
    """Noisy spellings a human (or a model) produces for one answer; the first is the clean one."""
    words = answer.split()
    out = [answer, answer.capitalize(), answer + ".", answer.upper(), "the " + answer, answer + "!",
           answer.replace(" ", "-"), answer + " ?", " " + answer + " ", answer.replace("'", "")]
    if words and words[0] in ("a", "an", "the"):
        out.append(" ".join(words[1:]))
    if answer.isdigit() and int(answer) <= 10:
        out.append(_NUMBER_WORDS[int(answer)])
    if answer.isdigit():
        out += [answer + ".0", f"{int(answer) * 1000:,}"]
    return out


def make_vqa_benchmark(n_questions: int, seed: int = 0) -> tuple[dict[int, str], list[dict[str, Any]]]:
    """Synthetic predictions and official-layout annotations (10 answers each, unique answer_id)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    bases = _base_answers()
    variants = [_variants(a) for a, _ in bases]
    n_b = len(bases)
    annotations: list[dict[str, Any]] = []
    predictions: dict[int, str] = {}
    # Draw everything numeric up front; the Python loop only assembles strings and dicts.
    kind = rng.random(n_questions)
    major = rng.integers(0, n_b, n_questions)
    alts = rng.integers(0, n_b, (n_questions, 3))
    n_alts = rng.integers(1, 4, n_questions)
    pick = rng.random((n_questions, 10))
    var = rng.integers(0, 1_000_000, (n_questions, 11))
    clean = rng.random((n_questions, 10))
    pred_kind = rng.random(n_questions)
    for q in range(n_questions):
        b = int(major[q])
        ans_type = bases[b][1]
        vs = variants[b]
        if kind[q] < 0.3:  # unanimous: ten copies of one spelling
            one = vs[var[q, 0] % len(vs)] if clean[q, 0] < 0.3 else vs[0]
            answers = [one] * 10
        else:
            answers = []
            for j in range(10):
                src = b if pick[q, j] < 0.6 else int(alts[q, j % n_alts[q]])
                sv = variants[src]
                answers.append(sv[0] if clean[q, j] < 0.6 else sv[var[q, j] % len(sv)])
        pk = pred_kind[q]
        if pk < 0.5:
            pred = vs[var[q, 10] % len(vs)]
        elif pk < 0.7:
            sv = variants[int(alts[q, 0])]
            pred = sv[var[q, 10] % len(sv)]
        elif pk < 0.9:
            pred = bases[int(var[q, 10] % n_b)][0]
        elif pk < 0.95:
            pred = ""
        else:
            pred = "\t" + vs[0] + "\n"
        qid = 1_000_000 + q
        annotations.append({
            "question_id": qid,
            "question_type": _QTYPES[ans_type][q % len(_QTYPES[ans_type])],
            "answer_type": ans_type,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)],
        })
        predictions[qid] = pred
    return predictions, annotations


def run_vqa_bench(n_questions: int, seed: int = 0, repeats: int = 3, evaluation: str = "current") -> dict[str, Any]:
    import numpy as np

    from evals.metrics import vqa as vqa_lib  # looked up at call time (tests stand in a broken one)
    from evals.metrics.vqa_reference import vqa_accuracy_reference

    predictions, annotations = make_vqa_benchmark(n_questions, seed)
    fast_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fast = vqa_lib.vqa_accuracy(predictions, annotations, evaluation=evaluation)
        fast_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ref = vqa_accuracy_reference(predictions, annotations, evaluation)
    ref_time = time.perf_counter() - t0

    mismatches = []
    if not np.array_equal(fast.per_sample, np.asarray(ref["accQA"])):
        mismatches.append(f"per-question accuracy differs on {int((fast.per_sample != np.asarray(ref['accQA'])).sum())} questions")
    if fast.value != ref["overall"] or fast.extra["unrounded"] != ref["overall_unrounded"]:
        mismatches.append(f"overall {fast.extra['unrounded']!r} vs reference {ref['overall_unrounded']!r}")
    for key, ref_key in (("per_answer_type", "perAnswerType"), ("per_question_type", "perQuestionType")):
        if {t: v["value"] for t, v in fast.extra[key].items()} != ref[ref_key]:
            mismatches.append(f"{key} differs")
    fast_s = min(fast_times)
    return {
        "n_questions": n_questions,
        "evaluation": evaluation,
        "accuracy": fast.value,
        "accuracy_unrounded": fast.extra["unrounded"],
        "identical": not mismatches,
        "mismatches": mismatches,
        "vectorised_s": fast_s,
        "reference_s": ref_time,
        "speedup": ref_time / fast_s,
    }


def _fid_bench() -> dict[str, Any]:
    from evals.bench.fid import run_fid_bench

    return run_fid_bench()


def command(
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    n_questions: Annotated[int, typer.Option("--n-questions", min=1, help="Synthetic VQA questions.")] = 200_000,
    fid: Annotated[bool, typer.Option("--fid/--no-fid", help="Also run the Fréchet-distance benchmark.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data.")] = 0,
    legacy: Annotated[bool, typer.Option("--legacy", help="Benchmark the pre-2021 official loop.")] = False,
    networks: Annotated[bool, typer.Option("--networks/--no-networks", help="Also benchmark each metric network's "
                                           "feature extraction against its plain forward.")] = True,
    n_images: Annotated[int, typer.Option("--n-images", min=2, help="Images per network benchmark.")] = 16,
    dinov2_arch: Annotated[str, typer.Option("--dinov2-arch", help="vits14 (default on CPU), vitb14 or vitl14.")] = "vits14",
    clip_arch: Annotated[str, typer.Option("--clip-arch", help="open_clip architecture, e.g. ViT-L-14-336.")] = "ViT-B-32",
    device: Annotated[str, typer.Option(help="Device of the network benchmark.")] = "cpu",
    repeats: Annotated[int, typer.Option(min=1, help="Interleaved repeats per network (medians reported).")] = 3,
) -> None:
    """Metric speed: vectorised VQA accuracy vs the official per-question loop (and FID when available)."""
    vqa = run_vqa_bench(n_questions, seed, evaluation="legacy-2017" if legacy else "current")
    out: dict[str, Any] = {"vqa": vqa, "vqa_speedup": vqa["speedup"], "vqa_identical": vqa["identical"]}
    out["fid"] = _fid_bench() if fid else {"skipped": "--no-fid"}
    if networks:
        from evals.bench.networks import run_network_bench

        out["networks"] = run_network_bench(n_images, repeats=repeats, dinov2_arch=dinov2_arch, clip_arch=clip_arch,
                                            device=device)
    else:
        out["networks"] = {"skipped": "--no-networks"}
    if json_out:
        typer.echo(json.dumps(out, default=str))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"VQA accuracy, {n_questions} synthetic questions")
        for col in ("implementation", "seconds", "ratio"):
            table.add_column(col)
        table.add_row("reference (official loop)", f"{vqa['reference_s']:.3f}", "1.0x")
        table.add_row("vectorised", f"{vqa['vectorised_s']:.3f}", f"{vqa['speedup']:.1f}x")
        console = Console()
        console.print(table)
        console.print(f"identical numbers: {'yes' if vqa['identical'] else 'NO'} (accuracy {vqa['accuracy']})")
        console.print(f"FID: {json.dumps(out['fid'], default=str)}")
        for name, r in out["networks"].items():
            if isinstance(r, dict) and "ratio" in r:
                console.print(f"{name}: extraction {r['extract_images_per_s']:.2f} img/s, plain forward "
                              f"{r['forward_images_per_s']:.2f} img/s, ratio {r['ratio']:.2f}")
    if not vqa["identical"]:
        typer.echo("error: vectorised VQA accuracy differs from the reference: " + "; ".join(vqa["mismatches"]), err=True)
        raise typer.Exit(1)
