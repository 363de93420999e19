"""The sampler: one batched decode loop for every task, with CM3leon's guidance and CD-K.

A request is one prompt; it becomes `n_candidates` samples, and each sample becomes one to three
*streams* that share every sampled token: the conditional prompt, the unconditional prompt
(classifier-free guidance, CD-K's amateur) and, for InstructPix2Pix-style editing, the
image-only prompt. A batch packs `prompts_per_step` whole prompts: P prompts x R rows
(R = candidates x streams). Each prompt's prefix of each stream kind is prefilled and stored once
and shared by its candidate rows; each row stores only the tokens it generates
(cm3leon/attention.py: prefix and suffix attention merged by log-sum-exp).

Randomness is counter-based: a sample draws one uniform number per step from
hash(seed, candidate, step), so its tokens do not depend on batch size, batch neighbours or
how samples are split across processes.

The loop is prefill -> decode_step x N -> collect. A decode step has static shapes and reads
nothing back to the host: the uniforms are hashed on the device, non-finite logits are recorded
there and raised after the batch, and text's stop check reads one flag every `SYNC_EVERY` steps,
so the host queues steps ahead of a GPU and torch.compile (CUDA graphs) captures the step once.

Image mode projects the final hidden state onto the image-code rows of the output weight only,
from a float32 copy of those rows, so guidance (which multiplies differences of logits) and
top-p run on float32 logits whatever the model's dtype.
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
from .attention import PrefixSuffixCache
from .transformer import Transformer


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
    # image mode: the image stream's template, one entry per step: -1 = a code the sampler samples,
    # a token id = forced at that step (sizes, end-of-line, end-of-image). None: image_seq_len codes
    structure: list[int] | None = None


@dataclass
class Generation:
    candidates: list[list[int]]  # text: token ids (stop token excluded); image: VQ codes of the free positions
    scores: list[float] | None = None
    best: int = 0
    finished: list[bool] = field(default_factory=list)  # text: stopped on a stop token (not the budget)
    # decode forwards each candidate's batch ran (its sequential cost), and the forwards the candidate
    # itself needed (jacobi: fewer than its tokens); empty when not counted
    forwards: list[int] = field(default_factory=list)
    own_forwards: list[int] = field(default_factory=list)

    @property
    def output(self) -> list[int]:
        return self.candidates[self.best]


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
    columns: torch.Tensor | None  # image mode: the image token ids (ascending) the logits cover
    head_weight: torch.Tensor | None  # image mode: float32 output rows of `columns` (logits over them only)
    barred: torch.Tensor | None  # text mode: [V] bool, tokens text may not emit
    is_stop: torch.Tensor  # [V] bool: text ends on any of these
    any_cdk: bool
    forcing: bool  # some sample has structural tokens to force
    prefilter: int | None  # text top-p: candidates kept before the nucleus, None = full sort
    pad_id: int
    static: bool = False  # compiled: logits stay in their buffer (see Sampler._fresh_state)


@dataclass
class DecodeState:
    """The device tensors of one batch; every step keeps their shapes. Rows are stream-major
    ([cond rows of every sample, uncond rows, ...]); within a stream, sample b = prompt * C + candidate."""

    logits: torch.Tensor  # [rows, V] next-token logits of every stream row (image mode: V = image codes)
    cache: PrefixSuffixCache
    out: torch.Tensor  # [b, budget] long: sampled token ids, -1 where none
    forced: torch.Tensor  # [b, budget] long: the token forced at each step, -1 where sampled
    done: torch.Tensor  # [b] bool
    stopped: torch.Tensor  # [b] bool: ended on a stop token
    limits: torch.Tensor  # [b] long: each sample's token budget
    uniforms: torch.Tensor  # [b, budget] float64
    cdk_rows: torch.Tensor  # [b] bool
    step: torch.Tensor  # [1] long: the step counter, on the device
    bad_step: torch.Tensor  # [rows] long: first step with non-finite logits, -1 if none
    inexact: torch.Tensor  # [1] bool: a prefiltered top-p step could not prove its token
    budget: int

    def tensors(self) -> list[torch.Tensor]:
        return [self.logits, self.out, self.forced, self.done, self.stopped, self.limits, self.uniforms,
                self.cdk_rows, self.step, self.bad_step, self.inexact, *self.cache.tensors()]


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
    nxt = plan.columns[nxt] if plan.columns is not None else nxt
    if plan.forcing:  # structural tokens: the template's id where it has one (static shape: a gather + where)
        forced = state.forced.index_select(1, state.step).squeeze(1)
        nxt = torch.where(forced >= 0, forced, nxt)
    return nxt


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
        tokens = nxt.repeat(plan.n_streams)[:, None]  # every stream of a sample is fed its token
        logits = model.extend_tensors(tokens, state.cache, kv_len, plan.head_weight)[:, 0].float()
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
        the full sort's token (None: always sort the vocabulary).
        The image-code rows of the output weight are copied to float32 here: a Sampler serves the
        weights it was built with."""
        self.model = model
        self.cfg = cfg or model.config
        self.device = device = model.tok_embeddings.weight.device
        self.image_mask = self.cfg.is_image_token_mask(device)
        self.token_to_code = self.cfg.token_to_code_tensor(device)
        self.image_columns = self.cfg.image_token_id_tensor(device).sort().values
        self.image_head = model.output.weight.detach().index_select(0, self.image_columns).float()
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
        self._reusable: dict[tuple, DecodeState] = {}
        self._bucket = KV_BUCKET if device.type == "cuda" else CPU_KV_BUCKET

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig,
                 prompts_per_step: int = 8) -> list[Generation]:
        """Every request's `n_candidates` samples. A batch packs `prompts_per_step` whole prompts (all
        their candidates and streams); a request's tokens depend only on its seed, never on the batch."""
        sampling.validate()
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        outputs: dict[tuple[int, int], tuple] = {}
        # group by modality so a batch has one kind of step
        for modality in ("image", "text"):
            group = [r for r, req in enumerate(requests) if req.modality == modality]
            for start in range(0, len(group), prompts_per_step):
                batch = [_Sample(r, c, requests[r].seed, sampling.uses_cdk(c))
                         for r in group[start:start + prompts_per_step] for c in range(sampling.n_candidates)]
                for s, out in zip(batch, self._run_batch(requests, batch, sampling, modality)):
                    outputs[(s.request, s.candidate)] = out
        results = []
        for r in range(len(requests)):
            outs = [outputs[(r, c)] for c in range(sampling.n_candidates)]
            results.append(Generation([o[0] for o in outs], finished=[o[1] for o in outs],
                                      forwards=[o[2] for o in outs if len(o) > 2],
                                      own_forwards=[o[3] for o in outs if len(o) > 3]))
        return results

    # -- one batch: prefill -> decode -> collect
    def _run_batch(self, requests, batch: list[_Sample], sampling: SamplingConfig, modality: str,
                   exact: bool = False) -> list[tuple]:
        if sampling.decoding == "jacobi" and modality == "image":
            from .jacobi import run_jacobi_batch  # speculative Jacobi decoding (image tokens)
            return run_jacobi_batch(self, requests, batch, sampling, NonFiniteLogitsError)
        state, plan = self.prefill(requests, batch, sampling, modality, exact=exact)
        try:
            self.decode(state, plan, batch)
            return self.collect(state, plan, batch)
        except _Inexact:
            # a prefiltered top-p step could not prove its token: redo the batch with full sorts
            return self._run_batch(requests, batch, sampling, modality, exact=True)

    def plan(self, sampling: SamplingConfig, modality: str, n_streams: int, any_cdk: bool,
             exact: bool = False, forcing: bool = False) -> StepPlan:
        vocab = self.cfg.vocab_size
        prefilter = None
        if (modality == "text" and not exact and not sampling.greedy and self.top_p_prefilter
                and sampling.top_p is not None and sampling.top_p < 1.0 and self.top_p_prefilter < vocab):
            prefilter = self.top_p_prefilter
        image = modality == "image"
        is_stop = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        is_stop[self.stop_ids] = True
        return StepPlan(n_streams=n_streams, modality=modality, sampling=sampling,
                        columns=self.image_columns if image else None, head_weight=self.image_head if image else None,
                        barred=None if image else ~self.text_allowed, is_stop=is_stop,
                        any_cdk=any_cdk and sampling.cdk_alpha is not None, forcing=forcing, prefilter=prefilter,
                        pad_id=self.cfg.pad_id, static=self.compiled)

    def _templates(self, requests, batch: list[_Sample], modality: str) -> list[list[int]]:
        """Each sample's per-step template: forced token ids, -1 where sampled (its length is the budget)."""
        out = []
        for s in batch:
            req = requests[s.request]
            if req.structure is not None and modality != "image":
                raise ValueError("GenerationRequest.structure is for image requests only")
            if req.structure is not None:
                if not req.structure or any(t != -1 and not 0 <= t < self.cfg.vocab_size for t in req.structure):
                    raise ValueError("structure entries must be -1 (sampled) or token ids of the vocabulary")
                out.append(list(req.structure))
            else:
                out.append([-1] * (self.cfg.image_seq_len if modality == "image" else req.max_new_tokens))
        return out

    def prefill(self, requests, batch: list[_Sample], sampling: SamplingConfig, modality: str, *,
                exact: bool = False, extra_slots: int = 0) -> tuple[DecodeState, StepPlan]:
        """Prefill each prompt's prefix of each stream kind once (right-padded per kind), share its
        first-step logits with its candidate rows and set up the step state; all host->device copies
        of the batch happen here."""
        dev, C = self.device, sampling.n_candidates
        prompts = [_stream_prompts(requests[s.request], sampling) for s in batch[::C]]  # [P][kind]
        P, n_streams = len(prompts), len(prompts[0])
        if any(len(p) == 0 for streams in prompts for p in streams):
            raise ValueError("empty prompt: every stream needs at least one token (e.g. <bos>)")
        templates = self._templates(requests, batch, modality)
        budget = max(map(len, templates))
        lens = [max(len(streams[k]) for streams in prompts) for k in range(n_streams)]
        if self.compiled:  # a few prefix shapes, so compiled steps are reused across batches
            lens = [-(-n // self._bucket) * self._bucket for n in lens]
        plan = self.plan(sampling, modality, n_streams, any(s.cdk for s in batch), exact,
                         forcing=any(t >= 0 for tpl in templates for t in tpl))
        width = self.cfg.vocab_size if plan.head_weight is None else plan.head_weight.shape[0]
        state = self._fresh_state(P, C, lens, budget, width, extra_slots)
        blocks = []
        for kind, n in enumerate(lens):
            tokens = torch.full((P, n), self.cfg.pad_id, dtype=torch.long)
            for p, streams in enumerate(prompts):
                tokens[p, :len(streams[kind])] = torch.tensor(streams[kind], dtype=torch.long)
            lengths = torch.tensor([len(streams[kind]) for streams in prompts], dtype=torch.long)
            logits = self.model.prefill_prefix(kind, tokens.to(dev), lengths.to(dev), state.cache,
                                               head_weight=plan.head_weight)
            blocks.append(logits.float().repeat_interleave(C, 0))  # a prefix's first logits serve its C rows
        logits = torch.cat(blocks)
        state.limits.copy_(torch.tensor([len(t) for t in templates]))
        state.forced.copy_(torch.tensor([t + [-1] * (budget - len(t)) for t in templates]))
        state.uniforms.copy_(sample_uniforms([s.seed for s in batch], [s.candidate for s in batch], budget, dev))
        state.cdk_rows.copy_(torch.tensor([s.cdk for s in batch]))
        if self.compiled:
            state.logits.copy_(logits)  # the compiled step reads and writes this one buffer
        else:
            state.logits = logits
        return state, plan

    def _fresh_state(self, P: int, C: int, prefix_lens: list[int], budget: int, width: int,
                     extra_slots: int = 0) -> DecodeState:
        """The step state of a batch. Compiled, the last batch's tensors are reset and reused when
        the shapes match (prefix lengths rounded up to a KV bucket so they usually do): CUDA graphs
        then replay on the same addresses instead of being captured again for every batch."""
        dev, b, n_rows = self.device, P * C, len(prefix_lens) * P * C
        key = (P, C, tuple(prefix_lens), budget, width, extra_slots)
        state = self._reusable.get(key)
        if state is not None:
            state.cache.reset()
            for t, value in ((state.out, -1), (state.done, 0), (state.stopped, 0), (state.step, 0),
                             (state.bad_step, -1), (state.inexact, 0)):
                t.fill_(value)
            return state
        self._reusable.clear()  # one batch's worth of buffers at a time: a KV cache can be most of a GPU
        # the last step samples without a forward: budget - 1 suffix slots
        # (`extra_slots`: jacobi's window beyond that)
        cache = self.model.new_prefix_cache(prefix_lens, P, C, max(1, budget - 1) + extra_slots, device=dev)
        state = DecodeState(
            logits=torch.zeros(n_rows, width, device=dev), cache=cache,
            out=torch.full((b, budget), -1, dtype=torch.long, device=dev),
            forced=torch.full((b, budget), -1, dtype=torch.long, device=dev),
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

    def _kv_len(self, cache: PrefixSuffixCache) -> int:
        need = cache.length + 1
        if not self.compiled:
            return need  # eager: attend over the filled suffix slots only
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
                model.check_extend(cache, 1, kv_len)
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
                    model.check_extend(cache)  # raises: a sample still runs past max_seq_len

    @staticmethod
    def _read_flags(state: DecodeState, batch: list[_Sample]) -> tuple[bool, bool]:
        """One device read: (all samples done, some step inexact); raises on non-finite logits."""
        flags = torch.stack([state.done.all(), state.inexact[0], (state.bad_step >= 0).any()]).tolist()
        if flags[2]:
            _raise_non_finite(state.bad_step.tolist(), batch)
        return bool(flags[0]), bool(flags[1])

    def collect(self, state: DecodeState, plan: StepPlan, batch: list[_Sample]) -> list[tuple[list[int], bool]]:
        """Bring a finished batch to the host (one read of every tensor) and cut each sample's tokens:
        text up to its stop token, images the codes of their free (not forced) positions."""
        bad_step, inexact = state.bad_step.tolist(), bool(state.inexact)
        if any(s >= 0 for s in bad_step):
            _raise_non_finite(bad_step, batch)
        if inexact:  # the steps after the last flag read
            raise _Inexact()
        out, stopped, forced = state.out.tolist(), state.stopped.tolist(), state.forced.tolist()
        codes = self.token_to_code.tolist() if plan.modality == "image" else None
        results = []
        for row, stop, fixed in zip(out, stopped, forced):
            if codes is not None:
                results.append(([codes[t] for t, f in zip(row, fixed) if t >= 0 and f < 0], True))
                continue
            seq = [t for t in row if t >= 0]
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
    for t in state.tensors():
        torch._dynamo.mark_static_address(t)


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
             sampling: SamplingConfig, *, prompts_per_step: int = 8) -> list[Generation]:
    """One-shot helper; keep a `Sampler` to reuse its token tables across calls."""
    return Sampler(model, cfg).generate(requests, sampling, prompts_per_step=prompts_per_step)


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
