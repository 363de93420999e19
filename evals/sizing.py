"""A task's prompts per step and modelled GPU time, decided once by the plan.

The rule is cm3leon/batching.py's; this module gives it a task's geometry before any prompt
exists: the prefix of each stream kind the task decodes (estimated from the family's stream
layout, the retrieved documents and shots, and TEXT_PART_TOKENS per text part), the rows per
prompt (candidates x streams) and the budget. The engine runs the task in chunks of
`prompts_per_step` prompts and each chunk is one sampler step (evals/predictor.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cm3leon import batching
from cm3leon.families import FILTER, Family

TEXT_PART_TOKENS = 64  # an estimate of one text part (caption, question, retrieved text)
DEFAULT_PROMPTS_PER_STEP = 8  # an injected predictor (tests): no model config to size from


def stream_kinds(spec: Any) -> list[str]:
    """The streams each candidate of the task decodes (the sampler's rule, SamplingConfig)."""
    sampling = spec.sampling_config()
    kinds = ["cond"]
    if spec.output_modality == "image" and sampling.needs_uncond:
        kinds.append("uncond")
    if spec.kind == "edit" and sampling.image_cfg_scale is not None:
        kinds.append("image_cond")
    return kinds


def prefix_len(cfg: Any, spec: Any, family: Family, stream: str, text_tokens: int = TEXT_PART_TOKENS) -> int:
    """Tokens of one stream's prompt, from the family's layout: bos, each context document
    (retrieved + shots: a text part of `text_tokens` and an image), the query's text and image."""
    layout = family.layout(spec.kind, stream)
    text = text_tokens
    if layout == FILTER:  # the conditional stream without its text
        layout, text = family.layout(spec.kind, "cond"), 0
    sep = len(family.separator)
    image = cfg.image_seq_len + 2  # boi codes eoi
    docs = spec.prompt.k_shot + (spec.retrieval.k if spec.retrieval.enabled else 0)
    doc = text + image + sep + len(family.context_end)
    sizes = {"context": docs * doc, "text": text, "text?": text + sep, "image": image, "sep": sep}
    return sum(sizes.get(slot, 1) for slot in layout or ())


@dataclass(frozen=True)
class TaskSizing:
    """What the plan decided for one task, and what it models the run to cost."""

    prompts_per_step: int
    kv_bytes_per_prompt: int | None = None  # None: not sized (--batch-size, or no model config)
    kv_budget: int | None = None
    overridden: bool = False
    gpu_seconds: float | None = None
    n_prompts: int | None = None  # the samples the time is for (None: unknown, the time is per 1,000)
    roofline: str = ""  # the GPU the time is modelled on, and why that one

    def describe(self, name: str) -> str:
        """One line for the plan's print."""
        how = "--batch-size" if self.overridden else None
        if how is None and self.kv_bytes_per_prompt is not None:
            how = f"KV {_bytes(self.kv_bytes_per_prompt)} per prompt of a {_bytes(self.kv_budget)} budget"
        n = self.prompts_per_step
        line = f"{name}: {n} prompt{'s' if n != 1 else ''} per step" + (f" ({how})" if how else "")
        if self.gpu_seconds is not None:
            n = f"for {self.n_prompts:,}" if self.n_prompts is not None else "per 1,000"
            line += f", modelled {_duration(self.gpu_seconds)} of GPU time {n} prompts on {self.roofline}"
        return line


def size_task(spec: Any, cfg: Any, family: Family | None, device: Any, tp: int = 1, n_samples: int | None = None,
              override: int | None = None) -> TaskSizing:
    """The task's prompts per step on `device` (an evals.devices.DeviceChoice) and the modelled
    GPU time of its run; `override` is --batch-size. Without a model config (`cfg` None) the
    override or DEFAULT_PROMPTS_PER_STEP."""
    if cfg is None or family is None:
        return TaskSizing(override or DEFAULT_PROMPTS_PER_STEP, overridden=bool(override))
    kinds = stream_kinds(spec)
    shape = batching.StepShape(prefix_lens=tuple(prefix_len(cfg, spec, family, k) for k in kinds),
                               n_rows=spec.sampling_config().n_candidates * len(kinds),
                               budget=cfg.image_seq_len if spec.output_modality == "image"
                               else spec.generation.max_new_tokens)
    kv = batching.kv_bytes_per_prompt(cfg, shape.prefix_lens, shape.n_rows, shape.budget, device.dtype, tp)
    budget = batching.kv_budget(device.total_memory, batching.weight_bytes(cfg, device.dtype, tp))
    prompts = batching.prompts_per_step(kv, budget, override=override)
    roof, own = batching.roofline_for(device.name if device.is_cuda else None)
    if own:
        modelled_prompts, dtype, where = prompts, device.dtype, f"this {roof.name}"
    else:  # a CPU run or an unknown GPU: an H100 in bf16, with the prompts per step its memory holds
        dtype = "bfloat16"
        ref_kv = batching.kv_bytes_per_prompt(cfg, shape.prefix_lens, shape.n_rows, shape.budget, dtype, tp)
        modelled_prompts = batching.prompts_per_step(ref_kv, batching.kv_budget(
            roof.memory, batching.weight_bytes(cfg, dtype, tp)))
        where = f"an {roof.name} in bf16 at {modelled_prompts} per step (reference; this run is on {device.device})"
    n = n_samples if n_samples is not None else 1000
    seconds = batching.modelled_seconds(cfg, shape, modelled_prompts, n, dtype, roof, tp)
    return TaskSizing(prompts, kv, budget, bool(override), seconds, n_samples, where)


def _bytes(n: int | None) -> str:
    n = n or 0
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    if seconds >= 1:
        return f"{seconds:.2g} s"
    return f"{seconds * 1e3:.2g} ms"
