"""Speculative Jacobi decoding keeps plain decoding's distribution (and a wrong acceptance rule is
caught by the same test); greedy SJD gives plain greedy's tokens exactly (the per-row KV rollback);
a seed's tokens do not depend on its batch; guidance with 2 and 3 streams and structure run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

import cm3leon.jacobi as jacobi
from cm3leon.config import ModelConfig
from cm3leon.sampling import GenerationRequest, Sampler, SamplingConfig
from cm3leon.transformer import Transformer


def model(codes: int = 32, seq_len: int = 12, scale: float = 5.0) -> Transformer:
    cfg = ModelConfig(vocab_size=80, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                      qk_norm=True, image_codebook_size=codes, image_seq_len=seq_len, image_token_offset=40,
                      bos_id=72, eos_id=73, pad_id=74, boi_id=75, eoi_id=76, break_id=77, mask_id=78)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        m.output.weight.mul_(scale)
    return m


def requests(n: int, seed: int = 1, **kw) -> list[GenerationRequest]:
    g = torch.Generator().manual_seed(seed)
    return [GenerationRequest([72] + torch.randint(0, 40, (int(torch.randint(2, 9, (1,), generator=g)),),
                                                   generator=g).tolist(), "image", seed=100 + i,
                              uncond_prompt=[72], image_cond_prompt=[72, 5], **kw) for i in range(n)]


def first_tokens(sampler: Sampler, sampling: SamplingConfig) -> np.ndarray:
    req = requests(1)[0]
    return np.array(sampler.generate([req], sampling, prompts_per_step=1)[0].candidates)


def _p_values(a: np.ndarray, b: np.ndarray, n_codes: int) -> list[float]:
    """Chi-square homogeneity p-values of each position's marginal and of the pair (0, 1)."""
    out = []
    stats = [(a[:, i], b[:, i], n_codes) for i in range(a.shape[1])]
    stats.append((a[:, 0] * n_codes + a[:, 1], b[:, 0] * n_codes + b[:, 1], n_codes * n_codes))
    for x, y, k in stats:
        table = np.stack([np.bincount(x, minlength=k), np.bincount(y, minlength=k)])
        table = table[:, table.sum(0) > 0]
        out.append(chi2_contingency(table)[1])
    return out


def test_sjd_keeps_the_distribution_and_the_test_detects_a_wrong_rule(monkeypatch):
    m = model(codes=4, seq_len=4, scale=3.0)
    sampler = Sampler(m)
    base = dict(cfg_scale=2.0, top_k=3, temperature=0.9, n_candidates=20_000)
    ar = first_tokens(sampler, SamplingConfig(**base))
    sjd = first_tokens(sampler, SamplingConfig(**base, decoding="jacobi", jacobi_window=3))
    p_ok = _p_values(ar, sjd, 4)
    # Bonferroni over the 5 statistics: each must pass 0.01 / 5
    assert min(p_ok) > 0.01 / len(p_ok), p_ok
    monkeypatch.setattr(jacobi, "accepts", lambda u, p, q: torch.ones_like(p, dtype=torch.bool))
    wrong = first_tokens(sampler, SamplingConfig(**base, decoding="jacobi", jacobi_window=3))
    p_wrong = _p_values(ar, wrong, 4)
    assert min(p_wrong) < 0.01, p_wrong


@pytest.mark.parametrize("window", [2, 5])
def test_greedy_sjd_gives_plain_greedy_tokens_with_structure(window):
    sampler = Sampler(model())
    structure = [-1, -1, -1, 77, -1, -1, -1, 77, -1, -1]
    reqs = requests(5) + requests(2, seed=3, structure=structure)
    for cfg in (1.0, 3.0):
        plain = sampler.generate(reqs, SamplingConfig(greedy=True, cfg_scale=cfg, n_candidates=2))
        sjd = sampler.generate(reqs, SamplingConfig(greedy=True, cfg_scale=cfg, n_candidates=2, decoding="jacobi",
                                                    jacobi_window=window), prompts_per_step=3)
        assert [g.candidates for g in sjd] == [g.candidates for g in plain]
        assert all(g.forwards and max(g.own_forwards) <= g.forwards[0] for g in sjd)


def test_a_seeds_tokens_do_not_depend_on_its_batch():
    sampler = Sampler(model())
    reqs = requests(5)
    sampling = SamplingConfig(cfg_scale=2.5, top_p=0.9, n_candidates=2, decoding="jacobi", jacobi_window=4)
    alone = [sampler.generate([r], sampling, prompts_per_step=1)[0].candidates for r in reqs]
    for per_step in (2, 5):
        assert [g.candidates for g in sampler.generate(reqs, sampling, prompts_per_step=per_step)] == alone


@pytest.mark.parametrize("streams", [2, 3])
def test_guidance_with_2_and_3_streams_runs(streams):
    sampler = Sampler(model())
    extra = dict(image_cfg_scale=1.5) if streams == 3 else {}
    sampling = SamplingConfig(cfg_scale=3.0, top_k=8, decoding="jacobi", jacobi_window=6, **extra)
    gens = sampler.generate(requests(3), sampling, prompts_per_step=2)
    assert all(len(g.output) == 12 and all(0 <= c < 32 for c in g.output) for g in gens)
    assert all(1 <= g.own_forwards[0] <= 11 for g in gens)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="^decoding"):
        SamplingConfig(decoding="beam").validate()
    with pytest.raises(ValueError, match="^jacobi_window"):
        SamplingConfig(decoding="jacobi", jacobi_window=1).validate()
    with pytest.raises(ValueError, match="CD-K"):
        SamplingConfig(decoding="jacobi", cdk_alpha=0.5, cfg_scale=2.0).validate()


def test_records_and_bench_counters():
    from types import SimpleNamespace

    from evals.bench.sampler_jacobi import run_jacobi_bench
    from evals.decoding import decoding_entry

    spec = SimpleNamespace(generation=SamplingConfig(decoding="jacobi", jacobi_window=8), output_modality="image")
    records = [{"extra": {"forwards": 10, "own_forwards": 8, "tokens": 32}}, {"extra": {"forwards": 10, "own_forwards": 4,
                                                                                        "tokens": 32}}]
    entry = decoding_entry(spec, records)
    assert entry["forwards_per_image"] == 10 and entry["accepted_tokens_per_forward"] == 64 / 12
    assert "published: 'ar'" in entry["deviation"]
    assert decoding_entry(SimpleNamespace(generation=SamplingConfig(), output_modality="image"), records) is None
    res = run_jacobi_bench(None, 4, image_seq_len=8)
    for key in ("forwards_per_image", "accepted_tokens_per_forward", "modelled_fid30k_gpu_hours"):
        assert set(res[key]) == {"ar", "jacobi"}
    assert res["forwards_per_image"]["ar"] == 7 and 1 <= res["forwards_per_image"]["jacobi"] <= 7
    assert res["accepted_tokens_per_forward"]["jacobi"] >= 1
