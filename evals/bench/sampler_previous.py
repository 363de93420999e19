"""The previous sampler engine, kept for `cm3eval bench sampler --geometry coco-fid` and the tests
that compare tokens: every stream row of every sample is one row of ONE left-padded batch over one
KV cache (Transformer.prefill / step_tensors), each row storing its whole prompt. The library's
sampler (cm3leon/sampling.py) stores one prefix per prompt instead; the two must give the same
tokens for the same seeds. Eager only (no torch.compile, no reused buffers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from cm3leon.config import ModelConfig
from cm3leon.counter_rng import sample_uniforms
from cm3leon import sampling as library
from cm3leon.sampling import (TOP_P_PREFILTER, Generation, GenerationRequest, NonFiniteLogitsError,
                              Sampler, SamplingConfig, _Inexact, _raise_non_finite, _Sample,
                              _stream_prompts)  # the sampler's stream rule, flags and errors
from cm3leon.transformer import KVCache, Transformer

CUDA_KV_SHARE = 0.4  # this engine's batch rule: samples whose rows fit this share of the free GPU memory
MAX_AUTO_BATCH = 64


def previous_batch_rule(kv_bytes_per_row: int, free_bytes: float, streams: int) -> int:
    """Samples per batch by this engine's rule (the KV cache of `streams` rows per sample within
    CUDA_KV_SHARE of the free memory, capped at MAX_AUTO_BATCH)."""
    return max(1, min(MAX_AUTO_BATCH, int(CUDA_KV_SHARE * free_bytes // (kv_bytes_per_row * streams))))


@dataclass(frozen=True)
class StepPlan:
    """Everything a decode step needs that is fixed for a batch."""

    n_streams: int
    modality: str
    sampling: SamplingConfig
    columns: torch.Tensor | None  # image mode: the image token ids (ascending) the step works on
    barred: torch.Tensor | None  # text mode: [V] bool, tokens text may not emit
    is_stop: torch.Tensor  # [V] bool: text ends on any of these
    any_cdk: bool
    prefilter: int | None  # text top-p: candidates kept before the nucleus, None = full sort
    pad_id: int
    forcing: bool = False  # this engine forces no structural tokens (the library step reads the flag)


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


def _choose(logits: torch.Tensor, state: DecodeState, plan: StepPlan) -> torch.Tensor:
    """This engine projected onto the whole vocabulary: image mode selects the image columns first,
    then the library's processors and sampling choose (the same guidance, CD-K, top-k and top-p)."""
    if plan.columns is not None:
        logits = logits.index_select(1, plan.columns)
    return library._choose(logits, state, plan)


def decode_step(model: Transformer, state: DecodeState, plan: StepPlan, kv_len: int | None) -> None:
    """One step: sample from state.logits, record, and run the model on the sampled tokens.

    `kv_len=None` only records (the last step needs no forward). Static shapes throughout, no host
    reads: this is the function torch.compile captures."""
    library._record_non_finite(state)
    nxt = library._record(_choose(state.logits, state, plan), state, plan)
    if kv_len is not None:
        logits = model.step_tensors(nxt.repeat(plan.n_streams), state.cache, kv_len).float()
        state.logits = logits
    state.step.add_(1)


class PreviousSampler:
    """The previous engine: `generate(requests, sampling, batch_size=)` with `batch_size` samples per batch."""

    def __init__(self, model: Transformer, cfg: ModelConfig | None = None, *,
                 text_barred: Sequence[int] | None = None, top_p_prefilter: int | None = TOP_P_PREFILTER):
        """The library Sampler's arguments, less `compile`."""
        self.model = model
        self.cfg = cfg or model.config
        self.device = device = model.tok_embeddings.weight.device
        self.image_mask = self.cfg.is_image_token_mask(device)
        self.token_to_code = self.cfg.token_to_code_tensor(device)
        self.image_columns = self.cfg.image_token_id_tensor(device).sort().values
        self.stop_set = {i for i in (self.cfg.eos_id, self.cfg.break_id, self.cfg.boi_id) if i is not None}
        self.stop_ids = torch.tensor(sorted(self.stop_set), device=device)
        if text_barred is None:
            text_barred = [i for i in (self.cfg.eoi_id, self.cfg.pad_id, self.cfg.bos_id, self.cfg.mask_id,
                                       self.cfg.infill_id) if i is not None and i not in self.stop_set]
        self.text_allowed = ~self.image_mask
        self.text_allowed[list(text_barred)] = False
        self.top_p_prefilter = top_p_prefilter
        self._step_fn = decode_step

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
                        pad_id=self.cfg.pad_id)

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
        state.logits = logits
        return state, self.plan(sampling, modality, n_streams, any(s.cdk for s in batch), exact)

    def _fresh_state(self, n_rows: int, b: int, budget: int, prompt_len: int) -> DecodeState:
        dev = self.device
        return DecodeState(
            logits=torch.zeros(n_rows, self.cfg.vocab_size, device=dev),
            cache=self.model.new_cache(n_rows, prompt_len + budget, device=dev),
            out=torch.full((b, budget), -1, dtype=torch.long, device=dev),
            done=torch.zeros(b, dtype=torch.bool, device=dev), stopped=torch.zeros(b, dtype=torch.bool, device=dev),
            limits=torch.zeros(b, dtype=torch.long, device=dev), uniforms=torch.zeros(b, budget, dtype=torch.float64, device=dev),
            cdk_rows=torch.zeros(b, dtype=torch.bool, device=dev), step=torch.zeros(1, dtype=torch.long, device=dev),
            bad_step=torch.full((n_rows,), -1, dtype=torch.long, device=dev),
            inexact=torch.zeros(1, dtype=torch.bool, device=dev), budget=budget)

    # the library's decode loop over this engine's whole-row cache: eager, so each step attends over
    # the filled slots (Sampler._kv_len), the same flag reads and max_seq_len checks
    compiled = False
    _kv_len = Sampler._kv_len
    decode = Sampler.decode
    _read_flags = staticmethod(Sampler._read_flags)  # the same device flags, the same one read

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
