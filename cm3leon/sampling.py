"""The sampler: one batched decode loop for every task, with CM3leon's guidance and CD-K.

A request is one prompt; it becomes `n_candidates` samples, and each sample becomes one to three
*streams* that share every sampled token: the conditional prompt, the unconditional prompt
(classifier-free guidance, CD-K's amateur) and, for InstructPix2Pix-style editing, the
image-only prompt. All streams of a batch run as rows of ONE left-padded batch over one KV cache
allocated once.

Randomness is counter-based: a sample draws one uniform number per step from
hash(seed, candidate, step), so its tokens do not depend on batch size, batch neighbours or
how samples are split across processes.

The loop is prefill -> decode_step x N -> collect. A decode step has static shapes and reads
nothing back to the host: the uniforms are hashed on the device, non-finite logits are recorded
there and raised after the batch, and text's stop check reads one flag every `SYNC_EVERY` steps,
so the host queues steps ahead of a GPU and torch.compile (CUDA graphs) captures the step once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from .config import ModelConfig
from .counter_rng import sample_uniform, sample_uniforms, splitmix64_tensor  # noqa: F401  (public API here)
from .errors import Cm3evalError
from .processors import (apply_guidance, cdk_candidate_mask, cdk_scores, sample_from_logits,  # noqa: F401
                         sample_top_p_prefiltered, top_k_filter)
from .sampling_config import SamplingConfig  # torch-free (the plan phase imports it alone); the one class
from .transformer import KVCache, Transformer


class NonFiniteLogitsError(Cm3evalError, RuntimeError):
    """The model produced NaN or +/-inf logits; sampling from them would give garbage silently."""


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
                    streams: int = 2, cap: int = MAX_AUTO_BATCH, *, seq_len: int | None = None,
                    tp: int = 1) -> int:
    """Samples per batch when the user gives none: as many as fit a KV-cache budget.

    A sample's cache holds `streams` rows (cond + uncond for guidance) of `seq_len` positions
    (default max_seq_len; a caller that knows prompt + budget passes it), so a 7B Chameleon
    (2 GiB per bf16 row) gets a handful on an 80 GB GPU and the 4M-parameter demo model the cap
    on a laptop, where small batches would be all Python overhead. With `tp` ranks splitting the
    KV heads, each rank holds 1/tp of a row."""
    positions = seq_len if seq_len is not None else cfg.max_seq_len
    per_row = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * positions * torch.empty((), dtype=dtype).element_size()
    per_row = max(1, per_row // max(1, tp))
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        budget = CUDA_KV_SHARE * free
    else:
        budget = CPU_KV_BUDGET
    return max(1, min(cap, int(budget // (per_row * streams))))


# ----------------------------------------------------------------------------- the decode loop
SYNC_EVERY = 16  # text: read the all-done flag once per this many steps (the only host read in the loop)
KV_BUCKET = 256  # compiled CUDA steps attend over a multiple of this many slots: one graph per bucket
CPU_KV_BUCKET = 32  # the same on CPU, where padded attention costs more than a recompile saves
TOP_P_PREFILTER = 1024  # text top-p: candidates kept before the nucleus (exactness checked per row)


@dataclass
class _Sample:
    request: int
    candidate: int
    seed: int
    cdk: bool


def _stream_prompts(req: GenerationRequest, sampling: SamplingConfig) -> list[list[int]]:
    needs_uncond = sampling.needs_uncond
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


@dataclass(frozen=True)
class StepPlan:
    """Everything a decode step needs that is fixed for a batch (a compiled step guards on it)."""

    n_streams: int
    modality: str
    sampling: SamplingConfig
    columns: torch.Tensor | None  # image mode: the image token ids (ascending) the step works on
    barred: torch.Tensor | None  # text mode: [V] bool, tokens text may not emit
    is_stop: torch.Tensor  # [V] bool: text ends on any of these
    any_cdk: bool
    prefilter: int | None  # text top-p: candidates kept before the nucleus, None = full sort
    pad_id: int
    static: bool = False  # compiled: logits stay in their buffer (see Sampler._fresh_state)


@dataclass
class DecodeState:
    """The device tensors of one batch; every step keeps their shapes."""

    logits: torch.Tensor  # [rows, V] next-token logits of every stream row
    cache: KVCache
    out: torch.Tensor  # [b, budget] long: sampled token ids, -1 where none
    done: torch.Tensor  # [b] bool
    stopped: torch.Tensor  # [b] bool: ended on a stop token
    limits: torch.Tensor  # [b] long: each sample's token budget
    uniforms: torch.Tensor  # [b, budget] float64
    cdk_rows: torch.Tensor  # [b] bool
    step: torch.Tensor  # [1] long: the step counter, on the device
    bad_step: torch.Tensor  # [rows] long: first step with non-finite logits, -1 if none
    inexact: torch.Tensor  # [1] bool: a prefiltered top-p step could not prove its token
    budget: int


def _record_non_finite(state: DecodeState) -> None:
    """Note each row's first non-finite step on the device (raised after the batch).

    One sum per row: NaN or ±inf anywhere makes it non-finite (as would finite logits summing past
    float32's range, ~1e34 each, which are broken too). The broken rows are not cleaned up: every
    sampling path keeps its indices in range whatever the values, and their tokens are discarded."""
    bad = ~torch.isfinite(state.logits.sum(-1))
    state.bad_step.copy_(torch.where(bad & (state.bad_step < 0), state.step, state.bad_step))


def _choose(logits: torch.Tensor, state: DecodeState, plan: StepPlan) -> torch.Tensor:
    """Processors + sampling for one step: guided, masked, CD-K'd logits -> one token per sample."""
    s = plan.sampling
    if plan.columns is not None:  # image mode: only the image codes can be chosen, so only they are processed
        logits = logits.index_select(1, plan.columns)
    per_stream = logits.view(plan.n_streams, -1, logits.shape[-1])
    cond = per_stream[0]
    uncond = per_stream[1] if plan.n_streams > 1 else None
    image_cond = per_stream[2] if plan.n_streams > 2 else None
    guided = apply_guidance(cond, uncond, s.cfg_scale, image_cond, s.image_cfg_scale)
    if plan.barred is not None:
        guided = guided.masked_fill(plan.barred, float("-inf"))
    if plan.any_cdk:
        # CD-K: the expert is the (guided) conditional stream, the amateur the unconditional one
        amateur = uncond if plan.barred is None else uncond.masked_fill(plan.barred, float("-inf"))
        contrast = cdk_scores(guided, amateur, s.cdk_alpha, s.cdk_k)
        guided = torch.where(state.cdk_rows[:, None], contrast, guided)
    if s.greedy:
        nxt = guided.argmax(-1)
    else:
        scaled = top_k_filter(guided / s.temperature, s.top_k)
        u = state.uniforms.index_select(1, state.step).squeeze(1)
        if plan.prefilter is not None:
            nxt, exact = sample_top_p_prefiltered(scaled, u, s.top_p, plan.prefilter)
            state.inexact.logical_or_((~exact & ~state.done).any().view(1))
        else:
            nxt = sample_from_logits(scaled, u, s.top_p)
    return plan.columns[nxt] if plan.columns is not None else nxt


def _record(nxt: torch.Tensor, state: DecodeState, plan: StepPlan) -> torch.Tensor:
    """Write this step's tokens; update done / stopped; return the tokens to feed (pad when done)."""
    # a done row's column stays -1 (each column is written once, at its step)
    state.out[:, state.step] = torch.where(state.done, -1, nxt)[:, None]
    fed = torch.where(state.done, plan.pad_id, nxt)
    if plan.modality == "text":
        hit_stop = plan.is_stop[nxt] & ~state.done
        state.stopped.logical_or_(hit_stop)
        state.done.logical_or_(hit_stop)
    state.done.logical_or_((state.step + 1) >= state.limits)
    return fed


def decode_step(model: Transformer, state: DecodeState, plan: StepPlan, kv_len: int | None) -> None:
    """One step: sample from state.logits, record, and run the model on the sampled tokens.

    `kv_len=None` only records (the last step needs no forward). Static shapes throughout, no host
    reads: this is the function torch.compile captures."""
    _record_non_finite(state)
    nxt = _record(_choose(state.logits, state, plan), state, plan)
    if kv_len is not None:
        logits = model.step_tensors(nxt.repeat(plan.n_streams), state.cache, kv_len).float()
        if plan.static:
            state.logits.copy_(logits)  # compiled: one buffer in, the same buffer out
        else:
            state.logits = logits
    state.step.add_(1)


class Sampler:
    """Holds the token-space tables for one model; `generate` runs batches of requests."""

    def __init__(self, model: Transformer, cfg: ModelConfig | None = None, *,
                 text_barred: Sequence[int] | None = None, compile: bool = False,
                 top_p_prefilter: int | None = TOP_P_PREFILTER):
        """`text_barred`: non-image tokens text may not emit; default eoi, pad, bos, mask, infill
        (image codes are always barred from text, text always from images).
        `compile`: run the decode step through torch.compile ("reduce-overhead", i.e. CUDA graphs,
        on CUDA; the default mode elsewhere), one graph per batch shape and KV bucket.
        `top_p_prefilter`: text top-p samples through this many candidates when that provably gives
        the full sort's token (None: always sort the vocabulary)."""
        self.model = model
        self.cfg = cfg or model.config
        self.device = device = model.tok_embeddings.weight.device
        self.image_mask = self.cfg.is_image_token_mask(device)
        self.token_to_code = self.cfg.token_to_code_tensor(device)
        self.image_columns = self.cfg.image_token_id_tensor(device).sort().values
        # text ends on eos, <break>, or the start of an image
        self.stop_set = {i for i in (self.cfg.eos_id, self.cfg.break_id, self.cfg.boi_id) if i is not None}
        self.stop_ids = torch.tensor(sorted(self.stop_set), device=device)
        if text_barred is None:
            text_barred = [i for i in (self.cfg.eoi_id, self.cfg.pad_id, self.cfg.bos_id, self.cfg.mask_id,
                                       self.cfg.infill_id) if i is not None and i not in self.stop_set]
        self.text_allowed = ~self.image_mask
        self.text_allowed[list(text_barred)] = False
        self.compiled = compile
        self.top_p_prefilter = top_p_prefilter
        self._step_fn = _compiled_step(device) if compile else decode_step
        self._reusable: dict[tuple[int, ...], DecodeState] = {}
        self._bucket = KV_BUCKET if device.type == "cuda" else CPU_KV_BUCKET

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

    # -- one batch: prefill -> decode -> collect
    def _run_batch(self, requests, batch: list[_Sample], sampling: SamplingConfig, modality: str,
                   exact: bool = False) -> list[tuple[list[int], bool]]:
        state, plan = self.prefill(requests, batch, sampling, modality, exact=exact)
        try:
            self.decode(state, plan, batch)
            return self.collect(state, plan, batch)
        except _Inexact:
            # a prefiltered top-p step could not prove its token: redo the batch with full sorts
            return self._run_batch(requests, batch, sampling, modality, exact=True)

    def plan(self, sampling: SamplingConfig, modality: str, n_streams: int, any_cdk: bool,
             exact: bool = False) -> StepPlan:
        vocab = self.cfg.vocab_size
        prefilter = None
        if (modality == "text" and not exact and not sampling.greedy and self.top_p_prefilter
                and sampling.top_p is not None and sampling.top_p < 1.0 and self.top_p_prefilter < vocab):
            prefilter = self.top_p_prefilter
        image = modality == "image"
        is_stop = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        is_stop[self.stop_ids] = True
        return StepPlan(n_streams=n_streams, modality=modality, sampling=sampling,
                        columns=self.image_columns if image else None,
                        barred=None if image else ~self.text_allowed, is_stop=is_stop,
                        any_cdk=any_cdk and sampling.cdk_alpha is not None, prefilter=prefilter,
                        pad_id=self.cfg.pad_id, static=self.compiled)

    def prefill(self, requests, batch: list[_Sample], sampling: SamplingConfig, modality: str, *,
                exact: bool = False) -> tuple[DecodeState, StepPlan]:
        """Pack the batch's stream rows (stream-major: [cond..., uncond...]), run the prompts into
        a fresh cache and set up the step state; all host->device copies of the batch happen here."""
        cfg, dev, b = self.cfg, self.device, len(batch)
        streams = [_stream_prompts(requests[s.request], sampling) for s in batch]
        n_streams = len(streams[0])
        rows = [streams[i][j] for j in range(n_streams) for i in range(b)]
        if any(len(p) == 0 for p in rows):
            raise ValueError("empty prompt: every stream needs at least one token (e.g. <bos>)")
        T = max(len(p) for p in rows)
        limits = [cfg.image_seq_len if modality == "image" else requests[s.request].max_new_tokens for s in batch]
        tokens = torch.full((len(rows), T), cfg.pad_id, dtype=torch.long)
        valid = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, p in enumerate(rows):
            tokens[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i, T - len(p):] = True
        state = self._fresh_state(len(rows), b, max(limits), T)
        logits = self.model.prefill(tokens.to(dev), valid.to(dev), state.cache, last_only=True)[:, -1].float()
        state.limits.copy_(torch.tensor(limits))
        state.uniforms.copy_(sample_uniforms([s.seed for s in batch], [s.candidate for s in batch], state.budget, dev))
        state.cdk_rows.copy_(torch.tensor([s.cdk for s in batch]))
        if self.compiled:
            state.logits.copy_(logits)  # the compiled step reads and writes this one buffer
        else:
            state.logits = logits
        return state, self.plan(sampling, modality, n_streams, any(s.cdk for s in batch), exact)

    def _fresh_state(self, n_rows: int, b: int, budget: int, prompt_len: int) -> DecodeState:
        """The step state of a batch. Compiled, the last batch's tensors are reset and reused when
        the shapes match (the cache length rounded up to a KV bucket so they usually do): CUDA graphs
        then replay on the same addresses instead of being captured again for every batch."""
        dev, max_len = self.device, prompt_len + budget
        if self.compiled:
            max_len = -(-max_len // self._bucket) * self._bucket
        key = (n_rows, b, budget, max_len)
        state = self._reusable.get(key)
        if state is not None:
            state.cache.reset()
            for t, value in ((state.out, -1), (state.done, 0), (state.stopped, 0), (state.step, 0),
                             (state.bad_step, -1), (state.inexact, 0)):
                t.fill_(value)
            return state
        self._reusable.clear()  # one batch's worth of buffers at a time: a KV cache can be most of a GPU
        state = DecodeState(
            logits=torch.zeros(n_rows, self.cfg.vocab_size, device=dev), cache=self.model.new_cache(n_rows, max_len, device=dev),
            out=torch.full((b, budget), -1, dtype=torch.long, device=dev),
            done=torch.zeros(b, dtype=torch.bool, device=dev), stopped=torch.zeros(b, dtype=torch.bool, device=dev),
            limits=torch.zeros(b, dtype=torch.long, device=dev), uniforms=torch.zeros(b, budget, dtype=torch.float64, device=dev),
            cdk_rows=torch.zeros(b, dtype=torch.bool, device=dev), step=torch.zeros(1, dtype=torch.long, device=dev),
            bad_step=torch.full((n_rows,), -1, dtype=torch.long, device=dev),
            inexact=torch.zeros(1, dtype=torch.bool, device=dev), budget=budget)
        if self.compiled:
            self._reusable[key] = state
            if dev.type == "cuda":
                _mark_static(state)
        return state

    def _kv_len(self, cache: KVCache) -> int:
        need = cache.length + 1
        if not self.compiled:
            return need  # eager: attend over the filled slots only
        # a compiled step is one fixed shape: attend over a bucket of slots, the unfilled ones masked.
        # CPU buckets are small: no graph launch to save there, and padded attention costs more
        return min(cache.max_len, -(-need // self._bucket) * self._bucket)

    def decode(self, state: DecodeState, plan: StepPlan, batch: list[_Sample]) -> None:
        """Run the steps; raises _Inexact when a prefiltered top-p step was (the caller redoes the batch).

        The only host reads: text's flags every SYNC_EVERY steps, and one before a forward that the
        host knows would pass max_seq_len (it is an error only if some sample still runs)."""
        model, cache = self.model, state.cache
        for step in range(state.budget):
            last = step == state.budget - 1
            blocked = not last and cache.max_next_pos >= model.config.max_seq_len
            kv_len = None if (last or blocked) else self._kv_len(cache)
            if kv_len is not None:
                model.check_step(cache, kv_len)
            self._step_fn(model, state, plan, kv_len)
            if kv_len is not None:
                model.advance(cache)
            if last:
                break
            if blocked or (plan.modality == "text" and step % SYNC_EVERY == SYNC_EVERY - 1):
                all_done, inexact = self._read_flags(state, batch)
                if inexact:
                    raise _Inexact()
                if all_done:
                    break
                if blocked:
                    model.check_step(cache)  # raises: a sample still runs past max_seq_len

    @staticmethod
    def _read_flags(state: DecodeState, batch: list[_Sample]) -> tuple[bool, bool]:
        """One device read: (all samples done, some step inexact); raises on non-finite logits."""
        flags = torch.stack([state.done.all(), state.inexact[0], (state.bad_step >= 0).any()]).tolist()
        if flags[2]:
            _raise_non_finite(state.bad_step.tolist(), batch)
        return bool(flags[0]), bool(flags[1])

    def collect(self, state: DecodeState, plan: StepPlan, batch: list[_Sample]) -> list[tuple[list[int], bool]]:
        """Bring a finished batch to the host (one read of every tensor) and cut each sample's tokens."""
        bad_step, inexact = state.bad_step.tolist(), bool(state.inexact)
        if any(s >= 0 for s in bad_step):
            _raise_non_finite(bad_step, batch)
        if inexact:  # the steps after the last flag read
            raise _Inexact()
        out, stopped = state.out.tolist(), state.stopped.tolist()
        codes = self.token_to_code.tolist() if plan.modality == "image" else None
        results = []
        for row, stop in zip(out, stopped):
            seq = [t for t in row if t >= 0]
            if codes is not None:
                results.append(([codes[t] for t in seq], True))
            else:
                if stop and seq and seq[-1] in self.stop_set:
                    seq = seq[:-1]
                results.append((seq, bool(stop)))
        return results


class _Inexact(Exception):
    """Internal: a batch's prefiltered top-p could not prove a token; the batch is redone exactly."""


def _raise_non_finite(bad_step: list[int], batch: list[_Sample]) -> None:
    b = len(batch)
    first = min(s for s in bad_step if s >= 0)
    bad = sorted({batch[i % b].request for i, s in enumerate(bad_step) if s >= 0})
    raise NonFiniteLogitsError(
        f"non-finite logits (NaN/inf) at step {first} for request(s) {bad[:5]}: the model or its weights are broken")


def _mark_static(state: DecodeState) -> None:
    """Tell dynamo these buffers keep their addresses, so CUDA graphs may mutate them in place."""
    mark = torch._dynamo.mark_static_address
    for t in (state.logits, state.out, state.done, state.stopped, state.limits, state.uniforms, state.cdk_rows,
              state.step, state.bad_step, state.inexact):
        mark(t)
    c = state.cache
    for t in (*c.k, *c.v, c.valid, c.next_pos, c.slot):
        mark(t)


def _compiled_step(device: torch.device):
    """decode_step under torch.compile: CUDA graphs on CUDA (the step's launches replayed as one),
    inductor's fused kernels elsewhere. Each (batch shape, kv bucket) compiles once."""
    dynamo = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # one graph per KV bucket, and per batch shape
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 64))
    # static shapes on CPU too: inductor's dynamic-shape CPU kernels ran 5x slower than eager at batch 8
    return torch.compile(decode_step, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)


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
