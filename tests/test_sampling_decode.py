"""The GPU-grade decode loop: device uniforms, exact prefiltered top-p, deferred NaN errors, validation."""

from __future__ import annotations

import pytest
import torch

from cm3leon.config import ModelConfig
from cm3leon.errors import Cm3evalError
from cm3leon.sampling import (GenerationRequest, NonFiniteLogitsError, Sampler, SamplingConfig, sample_from_logits,
                              sample_top_p_prefiltered, sample_uniform, sample_uniforms)
from cm3leon.transformer import Transformer


def model(vocab: int = 80, max_seq_len: int = 256, scale: float = 20.0) -> Transformer:
    cfg = ModelConfig(vocab_size=vocab, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=max_seq_len,
                      qk_norm=True, image_codebook_size=32, image_seq_len=9, image_token_offset=40,
                      bos_id=72, eos_id=73, pad_id=74, boi_id=75, eoi_id=76, break_id=77, mask_id=78)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        m.output.weight.mul_(scale)
    return m


def text_requests(n: int, max_new: int = 12) -> list[GenerationRequest]:
    return [GenerationRequest([72, 3 + i % 30, 4 + i % 7], "text", seed=50 + i, max_new_tokens=max_new) for i in range(n)]


# ----------------------------------------------------------------------------- uniforms
def test_device_uniforms_equal_the_python_hash_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    seeds = [0, 1, 2**31 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64 + 5, -1, -(2**40)]
    seeds += torch.randint(0, 2**62, (40,), generator=g).tolist()
    candidates = [i % 9 for i in range(len(seeds))]
    n_steps = 300
    got = sample_uniforms(seeds, candidates, n_steps).tolist()
    for s, c, row in zip(seeds, candidates, got):
        assert row == [sample_uniform(s, c, t) for t in range(n_steps)]  # exact float64 equality
    assert got[0] != got[1] and all(0 <= x < 1 for row in got for x in row)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="hot"), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"), (dict(n_candidates=0), "n_candidates"),
    (dict(cdk_alpha=0.0), "cdk_alpha"), (dict(cdk_alpha=1.2), "cdk_alpha"), (dict(cdk_k=0), "cdk_k"),
    (dict(mix_cdk_fraction=1.5, cdk_alpha=0.1), "mix_cdk_fraction"), (dict(mix_cdk_fraction=0.5), "mix_cdk_fraction"),
    (dict(cfg_scale=float("inf")), "cfg_scale"), (dict(image_cfg_scale="2"), "image_cfg_scale"),
    (dict(greedy="yes"), "greedy"),
])
def test_validate_names_the_field_first(kwargs, field):
    with pytest.raises(ValueError) as err:
        SamplingConfig(**kwargs).validate()
    assert str(err.value).startswith(f"{field}: ")
    assert "\n" not in str(err.value)


def test_validate_accepts_the_edges():
    SamplingConfig(greedy=True, temperature=0.0).validate()  # greedy ignores the temperature
    SamplingConfig(top_p=1.0, top_k=1, cdk_alpha=1.0, mix_cdk_fraction=1.0, n_candidates=3, cfg_scale=0.0).validate()
    assert "temperature: must be > 0 (use greedy=true for argmax)" in _message(SamplingConfig(temperature=0))


def _message(s: SamplingConfig) -> str:
    try:
        s.validate()
    except ValueError as e:
        return str(e)
    return ""


# ----------------------------------------------------------------------------- top-p prefilter
def test_prefiltered_top_p_gives_the_full_sort_token_where_it_claims_exactness():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(400, 300, generator=g) * torch.linspace(0.5, 6, 400)[:, None]
    logits[:50, :40] = logits[:50, :1]  # ties at the top: the stable order (id up) must be kept
    logits[50:60] = 0.0  # a flat row: the nucleus is wider than any prefilter
    u = sample_uniforms(list(range(400)), [0] * 400, 1)[:, 0]
    for top_p in (0.3, 0.8, 0.95):
        full = sample_from_logits(logits, u, top_p)
        for k in (4, 32, 128):
            fast, exact = sample_top_p_prefiltered(logits, u, top_p, k)
            assert torch.equal(fast[exact], full[exact])
            assert not exact[50:60].any()
        assert exact.float().mean() > 0.3  # the fast path does apply to most peaked rows


@pytest.mark.parametrize("top_p, k", [(0.6, 8), (0.95, 2)])
def test_sampler_tokens_do_not_depend_on_the_prefilter(top_p, k):
    m = model(scale=4.0)  # soft distributions: k=2 cannot hold a 0.95 nucleus, so batches are redone
    reqs = text_requests(10)
    s = SamplingConfig(top_p=top_p, temperature=1.3)
    fast = Sampler(m, top_p_prefilter=k).generate(reqs, s, prompts_per_step=5)
    full = Sampler(m, top_p_prefilter=None).generate(reqs, s, prompts_per_step=5)
    assert [x.candidates for x in fast] == [x.candidates for x in full]
    assert len({tuple(x.output) for x in full}) > 1


# ----------------------------------------------------------------------------- deferred errors
def test_non_finite_logits_are_raised_after_the_step_naming_request_and_step():
    m = model()
    sampler = Sampler(m)
    real = m.extend_tensors
    calls = []

    def poisoned(tokens, cache, kv_len, head_weight=None):
        logits = real(tokens, cache, kv_len, head_weight)
        calls.append(1)
        if len(calls) == 3:  # the logits for step 3, row 1 (request 1) only
            logits[1] = float("nan")
        return logits

    m.extend_tensors = poisoned
    with pytest.raises(NonFiniteLogitsError, match=r"at step 3 for request\(s\) \[1\]") as err:
        sampler.generate(text_requests(3, max_new=40), SamplingConfig(), prompts_per_step=3)
    assert isinstance(err.value, Cm3evalError)


def test_text_that_stops_before_max_seq_len_is_not_an_error():
    m = model(max_seq_len=24)
    sampler = Sampler(m, text_barred=[])
    reqs = [GenerationRequest([72] + [3] * 15, "text", seed=0, max_new_tokens=30)]
    # eos forced at the 3rd step: the run ends well before position 24, though the budget would pass it
    real = m.extend_tensors

    def eos_soon(tokens, cache, kv_len, head_weight=None):
        logits = real(tokens, cache, kv_len, head_weight)
        if cache.length >= 1:  # the second forward: one generated token in the suffix
            logits[:, :, 73] = 1e4
        return logits

    m.extend_tensors = eos_soon
    out = sampler.generate(reqs, SamplingConfig(greedy=True))[0]
    assert out.finished == [True] and len(out.output) == 2
    m.extend_tensors = real
    with pytest.raises(ValueError, match="exceeds max_seq_len=24"):
        Sampler(m, text_barred=[73, 77, 75]).generate(reqs, SamplingConfig(greedy=True))


# ----------------------------------------------------------------------------- compiled step
def test_static_buffers_reused_across_batches_give_the_eager_tokens():
    """The compiled path's bookkeeping (bucketed cache, reused buffers, logits kept in place) without
    the compiler: a NaN batch between two good ones must not leak into the next."""
    m = model()
    static = Sampler(m)
    static.compiled = True  # what Sampler(compile=True) sets, with the eager step function
    reqs = [GenerationRequest([72, 3, 4 + i], "image", seed=i, uncond_prompt=[72, 78]) for i in range(6)]
    s = SamplingConfig(top_p=0.9, cfg_scale=2.0)
    want = [x.candidates for x in Sampler(m).generate(reqs, s, prompts_per_step=2)]
    assert [x.candidates for x in static.generate(reqs, s, prompts_per_step=2)] == want
    first = next(iter(static._reusable.values()))
    assert all(v.shape[1] % static._bucket == 0 for v in first.cache.prefix_valid)  # bucketed prefixes
    real = m.extend_tensors
    m.extend_tensors = lambda tokens, cache, kv_len, head_weight=None: real(tokens, cache, kv_len, head_weight) * float("nan")
    with pytest.raises(NonFiniteLogitsError):
        static.generate(reqs[:2], s, prompts_per_step=2)
    m.extend_tensors = real
    assert [x.candidates for x in static.generate(reqs, s, prompts_per_step=2)] == want
    assert next(iter(static._reusable.values())) is first  # the same buffers all along
    txt = text_requests(4)
    assert ([x.candidates for x in static.generate(txt, SamplingConfig(top_p=0.8), prompts_per_step=2)]
            == [x.candidates for x in Sampler(m).generate(txt, SamplingConfig(top_p=0.8), prompts_per_step=2)])


@pytest.mark.slow
def test_compiled_step_gives_the_eager_tokens():
    m = model()
    reqs_img = [GenerationRequest([72, 3, 4 + i], "image", seed=i, uncond_prompt=[72, 78]) for i in range(4)]
    s = SamplingConfig(top_p=0.9, cfg_scale=2.0)
    eager = Sampler(m).generate(reqs_img, s, prompts_per_step=2)
    compiled = Sampler(m, compile=True).generate(reqs_img, s, prompts_per_step=2)  # two batches: the second replays
    assert [x.candidates for x in compiled] == [x.candidates for x in eager]
