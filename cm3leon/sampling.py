"""The sampler: one batched decode loop for every task, with CM3leon's guidance and CD-K.

A request is one prompt; it becomes `n_candidates` samples, and each sample becomes one to three
*streams* that share every sampled token: the conditional prompt, the unconditional prompt
(classifier-free guidance, CD-K's amateur) and, for InstructPix2Pix-style editing, the
image-only prompt. All streams of a batch run as rows of ONE left-padded batch over one KV cache
allocated once.

Randomness is counter-based: a sample draws one uniform number per step from
hash(seed, candidate, step), so its tokens do not depend on batch size, batch neighbours or
how samples are split across processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from .config import ModelConfig
from .transformer import Transformer


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or +/-inf logits; sampling from them would give garbage silently."""


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    cfg_scale: float = 1.0  # text guidance: uncond + s * (cond - uncond)
    image_cfg_scale: float | None = None  # 3-stream editing guidance when set
    cdk_alpha: float | None = None  # contrastive decoding TopK (CD-K) when set
    cdk_k: int = 1
    mix_cdk_fraction: float = 0.0  # share of a request's candidates decoded with CD-K
    n_candidates: int = 1

    def validate(self) -> None:
        problems = []
        if not self.greedy and not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k must be >= 1, got {self.top_k}")
        if self.cdk_alpha is not None and not 0 <= self.cdk_alpha <= 1:
            problems.append(f"cdk_alpha must be in [0, 1], got {self.cdk_alpha}")
        if self.cdk_k < 1:
            problems.append(f"cdk_k must be >= 1, got {self.cdk_k}")
        if not 0 <= self.mix_cdk_fraction <= 1:
            problems.append(f"mix_cdk_fraction must be in [0, 1], got {self.mix_cdk_fraction}")
        if self.mix_cdk_fraction > 0 and self.cdk_alpha is None:
            problems.append("mix_cdk_fraction needs cdk_alpha")
        if self.n_candidates < 1:
            problems.append(f"n_candidates must be >= 1, got {self.n_candidates}")
        if problems:
            raise ValueError("invalid sampling settings: " + "; ".join(problems))

    def uses_cdk(self, candidate: int) -> bool:
        if self.cdk_alpha is None:
            return False
        if self.mix_cdk_fraction <= 0:
            return True
        return candidate < round(self.mix_cdk_fraction * self.n_candidates)


@dataclass
class GenerationRequest:
    prompt: list[int]
    modality: Literal["text", "image"]
    seed: int
    max_new_tokens: int = 64  # text only; an image is always exactly image_seq_len codes
    uncond_prompt: list[int] | None = None
    image_cond_prompt: list[int] | None = None


@dataclass
class Generation:
    candidates: list[list[int]]  # text: token ids (stop token excluded); image: VQ codes
    scores: list[float] | None = None
    best: int = 0
    finished: list[bool] = field(default_factory=list)  # text: stopped on a stop token (not the budget)

    @property
    def output(self) -> list[int]:
        return self.candidates[self.best]


# ----------------------------------------------------------------------------- batch size
CPU_KV_BUDGET = 1 << 30  # bytes; beyond ~1 GiB of cache a CPU batch stops getting cheaper per sample
CUDA_KV_SHARE = 0.4  # of the free GPU memory; the rest holds activations, logits and the allocator's slack
MAX_AUTO_BATCH = 64


def auto_batch_size(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    streams: int = 2, cap: int = MAX_AUTO_BATCH) -> int:
    """Samples per batch when the user gives none: as many as fit a KV-cache budget.

    A sample's cache holds `streams` rows (cond + uncond for guidance) of max_seq_len positions,
    so a 7B Chameleon (2 GiB per bf16 row) gets a handful on an 80 GB GPU and the 4M-parameter
    demo model the cap on a laptop, where small batches would be all Python overhead."""
    per_row = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cfg.max_seq_len * torch.empty((), dtype=dtype).element_size()
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        budget = CUDA_KV_SHARE * free
    else:
        budget = CPU_KV_BUDGET
    return max(1, min(cap, int(budget // (per_row * streams))))


# ----------------------------------------------------------------------------- randomness
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_uniform(seed: int, candidate: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, candidate, step)."""
    x = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ candidate) ^ step)
    return (x >> 11) * (1.0 / (1 << 53))


# ----------------------------------------------------------------------------- logits processors
def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float,
                   image_cond: torch.Tensor | None = None, image_scale: float | None = None) -> torch.Tensor:
    """CFG: uncond + s·(cond − uncond); editing: uncond + s_img·(img − uncond) + s_txt·(full − img)."""
    if image_cond is not None and image_scale is not None:
        return uncond + image_scale * (image_cond - uncond) + scale * (cond - image_cond)
    if uncond is None or scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def cdk_candidate_mask(expert_probs: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """CD-K's plausible set: V = {w : p_exp(w) >= alpha · (k-th largest p_exp)}."""
    kth = expert_probs.topk(min(k, expert_probs.shape[-1]), dim=-1).values[..., -1:]
    return expert_probs >= alpha * kth


def cdk_scores(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """log p_exp − log p_ama on CD-K's plausible set, −inf elsewhere."""
    log_exp = torch.log_softmax(expert_logits, dim=-1)
    log_ama = torch.log_softmax(amateur_logits, dim=-1)
    keep = cdk_candidate_mask(log_exp.exp(), alpha, k)
    score = log_exp - log_ama
    # an expert token the amateur rules out entirely (−inf) is maximally "contrastive"; keep it finite
    score = torch.where(torch.isfinite(score), score, log_exp + 1e4)
    return score.masked_fill(~keep, float("-inf"))


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """Inverse-CDF sampling with one given uniform per row; top-p over the sorted distribution."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    if top_p is not None and top_p < 1.0:
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token always stays
    cdf = sorted_probs.cumsum(-1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).clamp_max(cdf.shape[-1] - 1)
    # never land on a zero-probability tail token through rounding at the top of the CDF
    idx = torch.minimum(idx, (sorted_probs > 0).sum(-1, keepdim=True) - 1)
    return order.gather(-1, idx).squeeze(-1)


# ----------------------------------------------------------------------------- the decode loop
@dataclass
class _Sample:
    request: int
    candidate: int
    seed: int
    cdk: bool


def _stream_prompts(req: GenerationRequest, sampling: SamplingConfig) -> list[list[int]]:
    needs_uncond = sampling.cfg_scale != 1.0 or sampling.cdk_alpha is not None or sampling.image_cfg_scale is not None
    if needs_uncond and req.uncond_prompt is None:
        raise ValueError("guidance or CD-K needs an unconditional prompt (GenerationRequest.uncond_prompt)")
    if sampling.image_cfg_scale is not None and req.image_cond_prompt is None:
        raise ValueError("image_cfg_scale needs an image-only prompt (GenerationRequest.image_cond_prompt)")
    streams = [req.prompt]
    if needs_uncond:
        streams.append(req.uncond_prompt)
    if sampling.image_cfg_scale is not None:
        streams.append(req.image_cond_prompt)
    return streams


class Sampler:
    """Holds the token-space tables for one model; `generate` runs batches of requests."""

    def __init__(self, model: Transformer, cfg: ModelConfig | None = None, *,
                 text_barred: Sequence[int] | None = None):
        """`text_barred`: non-image tokens text may not emit; default eoi, pad, bos, mask, infill
        (image codes are always barred from text, text always from images)."""
        self.model = model
        self.cfg = cfg or model.config
        self.device = device = model.tok_embeddings.weight.device
        self.image_mask = self.cfg.is_image_token_mask(device)
        self.token_to_code = self.cfg.token_to_code_tensor(device)
        # text ends on eos, <break>, or the start of an image
        self.stop_set = {i for i in (self.cfg.eos_id, self.cfg.break_id, self.cfg.boi_id) if i is not None}
        self.stop_ids = torch.tensor(sorted(self.stop_set), device=device)
        if text_barred is None:
            text_barred = [i for i in (self.cfg.eoi_id, self.cfg.pad_id, self.cfg.bos_id, self.cfg.mask_id,
                                       self.cfg.infill_id) if i is not None and i not in self.stop_set]
        self.text_allowed = ~self.image_mask
        self.text_allowed[list(text_barred)] = False

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig,
                 batch_size: int = 8) -> list[Generation]:
        sampling.validate()
        samples = [_Sample(r, c, req.seed, sampling.uses_cdk(c))
                   for r, req in enumerate(requests) for c in range(sampling.n_candidates)]
        outputs: dict[tuple[int, int], tuple[list[int], bool]] = {}
        # group by modality so a batch has one token budget
        for modality in ("image", "text"):
            group = [s for s in samples if requests[s.request].modality == modality]
            for start in range(0, len(group), batch_size):
                batch = group[start:start + batch_size]
                for s, out in zip(batch, self._run_batch(requests, batch, sampling, modality)):
                    outputs[(s.request, s.candidate)] = out
        results = []
        for r in range(len(requests)):
            outs = [outputs[(r, c)] for c in range(sampling.n_candidates)]
            results.append(Generation([o[0] for o in outs], finished=[o[1] for o in outs]))
        return results

    def _run_batch(self, requests, batch: list[_Sample], sampling: SamplingConfig, modality: str):
        model, cfg, dev = self.model, self.cfg, self.device
        b = len(batch)
        streams = [_stream_prompts(requests[s.request], sampling) for s in batch]
        n_streams = len(streams[0])
        rows = [streams[i][j] for j in range(n_streams) for i in range(b)]  # stream-major: [cond..., uncond...]
        if any(len(p) == 0 for p in rows):
            raise ValueError("empty prompt: every stream needs at least one token (e.g. <bos>)")
        T = max(len(p) for p in rows)
        if modality == "image":
            budget = cfg.image_seq_len
        else:
            budget = max(requests[s.request].max_new_tokens for s in batch)
        tokens = torch.full((len(rows), T), cfg.pad_id, dtype=torch.long)
        valid = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, p in enumerate(rows):
            tokens[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i, T - len(p):] = True
        tokens, valid = tokens.to(dev), valid.to(dev)
        cache = model.new_cache(len(rows), T + budget, device=dev)
        logits = model.prefill(tokens, valid, cache, last_only=True)[:, -1]

        cdk_rows = torch.tensor([s.cdk for s in batch], device=dev)
        limits = torch.tensor([budget if modality == "image" else requests[s.request].max_new_tokens for s in batch],
                              device=dev)
        out = torch.full((b, budget), -1, dtype=torch.long, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        stopped = torch.zeros(b, dtype=torch.bool, device=dev)
        allowed = self.image_mask if modality == "image" else self.text_allowed
        for step in range(budget):
            logits = logits.float()
            if not torch.isfinite(logits).all():
                bad = sorted({batch[i % b].request for i in torch.nonzero(~torch.isfinite(logits).all(-1)).flatten().tolist()})
                raise NonFiniteLogitsError(
                    f"non-finite logits (NaN/inf) at step {step} for request(s) {bad[:5]}: the model or its weights are broken")
            per_stream = logits.view(n_streams, b, -1)
            cond = per_stream[0]
            uncond = per_stream[1] if n_streams > 1 else None
            image_cond = per_stream[2] if n_streams > 2 else None
            guided = apply_guidance(cond, uncond, sampling.cfg_scale, image_cond, sampling.image_cfg_scale)
            guided = guided.masked_fill(~allowed, float("-inf"))
            if sampling.cdk_alpha is not None and bool(cdk_rows.any()):
                # CD-K: the expert is the (guided) conditional stream, the amateur the unconditional one
                amateur = uncond.masked_fill(~allowed, float("-inf"))
                contrast = cdk_scores(guided, amateur, sampling.cdk_alpha, sampling.cdk_k)
                guided = torch.where(cdk_rows[:, None], contrast, guided)
            if sampling.greedy:
                nxt = guided.argmax(-1)
            else:
                scaled = top_k_filter(guided / sampling.temperature, sampling.top_k)
                u = torch.tensor([sample_uniform(s.seed, s.candidate, step) for s in batch],
                                 dtype=torch.float64, device=dev)
                nxt = sample_from_logits(scaled, u, sampling.top_p)
            nxt = torch.where(done, torch.full_like(nxt, cfg.pad_id), nxt)
            out[:, step] = torch.where(done, out[:, step], nxt)
            if modality == "text":
                hit_stop = torch.isin(nxt, self.stop_ids) & ~done
                stopped |= hit_stop
                done |= hit_stop
            done |= (step + 1) >= limits
            if bool(done.all()) or step == budget - 1:
                break
            logits = model.step(nxt.repeat(n_streams), cache)
        results = []
        for i in range(b):
            seq = out[i][out[i] >= 0].tolist()
            if modality == "image":
                codes = self.token_to_code[torch.tensor(seq, device=dev)].tolist()
                results.append((codes, True))
            else:
                if stopped[i] and seq and seq[-1] in self.stop_set:
                    seq = seq[:-1]
                results.append((seq, bool(stopped[i])))
        return results


def generate(model: Transformer, cfg: ModelConfig | None, requests: Sequence[GenerationRequest],
             sampling: SamplingConfig, *, batch_size: int = 8) -> list[Generation]:
    """One-shot helper; keep a `Sampler` to reuse its token tables across calls."""
    return Sampler(model, cfg).generate(requests, sampling, batch_size=batch_size)


@torch.no_grad()
def continuation_logprobs(model: Transformer, prompts: Sequence[Sequence[int]], continuation: Sequence[int],
                          *, pad_id: int = 0) -> list[float]:
    """log p(continuation | prompt) summed over the continuation's tokens, for each prompt.

    The reranker CM3 calls "self-contained": a text->image candidate is scored by how likely the
    model finds the caption given the candidate (image -> text), with no CLIP. The continuation is
    the same for every prompt, so the scores compare candidates without a length normaliser.
    Prompts are left-padded into one batch (the model's `valid` mask keeps padding out).
    """
    if not prompts:
        return []
    if not continuation:
        raise ValueError("continuation_logprobs needs at least one continuation token")
    device = model.tok_embeddings.weight.device
    P, C = max(len(p) for p in prompts), len(continuation)
    tokens = torch.full((len(prompts), P + C), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), P + C, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: the first continuation token needs a position to predict it")
        tokens[i, P - len(p):P] = torch.as_tensor(list(p), dtype=torch.long)
        valid[i, P - len(p):] = True
    tokens[:, P:] = torch.as_tensor(list(continuation), dtype=torch.long)
    logits = model(tokens.to(device), valid.to(device))[:, P - 1:P + C - 1].float()
    if not torch.isfinite(logits).all():
        raise NonFiniteLogitsError("the model produced non-finite logits while scoring a continuation")
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, P:].to(device)[..., None])[..., 0]
    return logp.sum(dim=1).tolist()


def rerank(generations: list[Generation], score_fn: Callable[[int, list[list[int]]], Sequence[float]]) -> list[Generation]:
    """Score every candidate (e.g. CLIPScore of the decoded image vs the prompt) and mark the best.

    All candidates are kept, so reports can show the losers beside the winner.
    """
    for i, gen in enumerate(generations):
        scores = [float(x) for x in score_fn(i, gen.candidates)]
        if len(scores) != len(gen.candidates):
            raise ValueError(f"score_fn returned {len(scores)} scores for {len(gen.candidates)} candidates")
        if any(math.isnan(s) for s in scores):
            raise ValueError(f"score_fn returned NaN for request {i}")
        gen.scores = scores
        gen.best = max(range(len(scores)), key=lambda j: (scores[j], -j))
    return generations
