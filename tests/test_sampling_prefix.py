"""One prefix per prompt: prefix + suffix attention equals full causal attention, and the sampler's
tokens equal the previous all-rows engine's at any number of prompts per step; structural tokens."""

from __future__ import annotations

import pytest
import torch

from cm3leon.attention import count_kv_reads, prefill_backend
from cm3leon.config import ModelConfig
from cm3leon.sampling import GenerationRequest, Sampler, SamplingConfig
from cm3leon.transformer import Transformer
from evals.bench.sampler_previous import PreviousSampler


def model(n_kv_heads: int = 2) -> Transformer:
    cfg = ModelConfig(vocab_size=80, d_model=48, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=256,
                      qk_norm=True, image_codebook_size=32, image_seq_len=9, image_token_offset=40,
                      bos_id=72, eos_id=73, pad_id=74, boi_id=75, eoi_id=76, break_id=77, mask_id=78)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        m.output.weight.mul_(20)
    return m


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[72] + torch.randint(0, 40, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_prefix_plus_suffix_attention_equals_full_causal_attention(n_kv_heads):
    m = model(n_kv_heads)
    g = torch.Generator().manual_seed(1)
    P, C = 3, 2
    lens = [[5, 9, 3], [2, 2, 4]]  # two stream kinds, prompts of different lengths (padding masked)
    prefixes = [[torch.randint(0, 70, (n,), generator=g).tolist() for n in kind] for kind in lens]
    suffix = torch.randint(0, 70, (2 * P * C, 6), generator=g)
    with torch.no_grad():
        cache = m.new_prefix_cache([max(k) for k in lens], P, C, 8)
        for kind, ps in enumerate(prefixes):
            tokens = torch.full((P, max(lens[kind])), 74)
            for p, pr in enumerate(ps):
                tokens[p, :len(pr)] = torch.tensor(pr)
            first = m.prefill_prefix(kind, tokens, torch.tensor(lens[kind]), cache)
            for p, pr in enumerate(ps):
                torch.testing.assert_close(first[p], m(torch.tensor([pr]))[0, -1], atol=1e-5, rtol=0)
        # one token, then one, then three at once (causal among themselves) over a bucket of 8 slots
        got = torch.cat([m.extend(suffix[:, :1], cache), m.extend(suffix[:, 1:2], cache),
                         m.extend(suffix[:, 2:5], cache, kv_len=8)], 1)
        worst = 0.0
        for r in range(2 * P * C):
            pr = prefixes[r // (P * C)][(r % (P * C)) // C]
            full = m(torch.tensor([pr + suffix[r, :5].tolist()]))[0, len(pr):]
            worst = max(worst, (full - got[r]).abs().max().item())
    assert worst < 1e-5, worst
    with pytest.raises(ValueError, match="full"):
        m.extend(suffix[:, :4], cache)  # 5 of 8 slots filled


def _image(ps, seed0=10, three=False):
    return [GenerationRequest(p, "image", seed=seed0 + i, uncond_prompt=[72, 78],
                              image_cond_prompt=([72, 75] + p[1:3]) if three else None) for i, p in enumerate(ps)]


CASES = {
    "image-cfg": (lambda ps: _image(ps), SamplingConfig(top_p=0.9, cfg_scale=3.0, n_candidates=3)),
    "image-edit-3-streams": (lambda ps: _image(ps, three=True),
                             SamplingConfig(top_p=0.9, cfg_scale=2.5, image_cfg_scale=1.5, n_candidates=2)),
    "image-cdk": (lambda ps: _image(ps), SamplingConfig(cdk_alpha=0.1, cdk_k=2, n_candidates=4, mix_cdk_fraction=0.5)),
    "text": (lambda ps: [GenerationRequest(p, "text", seed=30 + i, max_new_tokens=12) for i, p in enumerate(ps)],
             SamplingConfig(temperature=1.0, top_p=0.9, n_candidates=2)),
    "text-greedy": (lambda ps: [GenerationRequest(p, "text", seed=i, max_new_tokens=10) for i, p in enumerate(ps)],
                    SamplingConfig(greedy=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tokens_at_1_3_and_8_prompts_per_step_and_as_the_previous_engine(case):
    m = model()
    make, sampling = CASES[case]
    reqs = make(prompts(8, seed=5))
    previous = [g.candidates for g in PreviousSampler(m).generate(reqs, sampling, batch_size=5)]
    sampler = Sampler(m)
    for n in (1, 3, 8):
        assert [g.candidates for g in sampler.generate(reqs, sampling, prompts_per_step=n)] == previous, n
    assert len({tuple(c) for g in previous for c in g}) > 4  # real, varied samples were compared


def test_the_decode_step_reads_each_prefix_once_and_each_rows_own_suffix():
    m = model()
    reqs = _image([[72, 3, 4, 5, 6, 7, 75], [72, 8, 9, 75]])
    s = SamplingConfig(top_p=0.9, cfg_scale=3.0, n_candidates=4)
    with count_kv_reads() as reads:
        Sampler(m).generate(reqs, s, prompts_per_step=2)
    steps, layers, budget = 8, 2, 9  # 9 codes: 8 forwards
    prefix = 2 * (7 + 2)  # per kind: P=2 prompts x the kind's longest prefix (7 conditional, 2 unconditional)
    suffix = 2 * 2 * 4 * sum(range(1, budget))  # 16 rows, each reading its filled slots
    assert reads.positions == layers * (steps * prefix + suffix)
    assert prefill_backend("cpu") != "MATH"  # prefill broadcasts GQA heads in a fused kernel


def test_structure_forces_tokens_in_place_and_candidates_are_the_free_codes():
    m = model()
    cfg = m.config
    eol, eoi = 77, 76  # structural ids outside the image codes
    structure = [-1, -1, -1, eol, -1, -1, -1, eol, -1, -1, eoi]
    req = GenerationRequest([72, 3, 4, 75], "image", seed=7, uncond_prompt=[72, 78], structure=structure)
    s = SamplingConfig(top_p=0.9, cfg_scale=2.0, n_candidates=2)
    sampler = Sampler(m)
    seen = []
    real = m.extend_tensors

    def spy(tokens, cache, kv_len, head_weight=None):
        seen.append(tokens[:, 0].tolist())
        return real(tokens, cache, kv_len, head_weight)

    m.extend_tensors = spy
    try:
        gen = sampler.generate([req], s)[0]
    finally:
        m.extend_tensors = real
    assert all(len(c) == structure.count(-1) == 8 for c in gen.candidates)
    assert all(0 <= x < cfg.image_codebook_size for c in gen.candidates for x in c)
    # every stream row was fed the forced id at its step (the last step has no forward)
    for step, fed in enumerate(seen):
        if structure[step] >= 0:
            assert set(fed) == {structure[step]}
        else:
            assert all(40 <= t < 72 for t in fed)
    # the free codes are the ones sampled at the free steps: the same seed without forcing differs after step 3
    free = sampler.generate([GenerationRequest(req.prompt, "image", seed=7, uncond_prompt=[72, 78])], s)[0]
    assert [c[:3] for c in free.candidates] == [c[:3] for c in gen.candidates]
    with pytest.raises(ValueError, match="structure"):
        sampler.generate([GenerationRequest([72, 3], "text", seed=0, uncond_prompt=[72], structure=[-1])], s)
    with pytest.raises(ValueError, match="structure"):
        sampler.generate([GenerationRequest([72, 3], "image", seed=0, uncond_prompt=[72], structure=[-1, 999])], s)
