"""The sampler: parity with transformers' greedy generate, guidance algebra, CD-K sets, batch invariance."""

from __future__ import annotations

import pytest
import torch

from cm3leon import checkpoint
from cm3leon.config import ModelConfig
from cm3leon.sampling import (GenerationRequest, NonFiniteLogitsError, Sampler, SamplingConfig, apply_guidance,
                              cdk_candidate_mask, cdk_scores, continuation_logprobs, generate, rerank,
                              sample_uniform)
from cm3leon.transformer import Transformer

from chameleon_fixture import hf_folder, hf_model  # noqa: F401


def tiny_model(seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab_size=80, d_model=48, n_layers=2, n_heads=4, max_seq_len=256, qk_norm=True,
                      image_codebook_size=32, image_seq_len=9, image_token_offset=40,
                      bos_id=72, eos_id=73, pad_id=74, boi_id=75, eoi_id=76, break_id=77, mask_id=78)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharper distributions than the 0.02 init, so samples are not uniform noise
        model.output.weight.mul_(20)
    return model


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[72] + torch.randint(0, 40, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_greedy_equals_transformers_generate(hf_folder):
    bundle = checkpoint.load(hf_folder)
    hf = hf_model(hf_folder)
    cfg = bundle.config
    text_lo = cfg.vocab_size - 30
    g = torch.Generator().manual_seed(7)
    batch = [[cfg.bos_id] + torch.randint(text_lo, cfg.vocab_size, (n,), generator=g).tolist() for n in (6, 3, 9, 5)]
    n_new = 12
    # transformers: left-padded batch, greedy; its Chameleon masks image-token logits, as our text mode does
    T = max(map(len, batch))
    ids = torch.tensor([[cfg.pad_id] * (T - len(s)) + s for s in batch])
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in batch])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                          pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id)[:, T:]
    sampler = Sampler(bundle.model, cfg, text_barred=[])  # transformers bars nothing but image codes
    reqs = [GenerationRequest(p, "text", seed=0, max_new_tokens=n_new) for p in batch]
    ours = sampler.generate(reqs, SamplingConfig(greedy=True), prompts_per_step=4)
    n_compared = 0
    for gen, row in zip(ours, ref.tolist()):
        expected = []
        for t in row:  # our text ends at eos/<break>/<image>; compare up to that point
            if t in sampler.stop_set:
                break
            expected.append(t)
        assert gen.output == expected
        n_compared += len(expected)
    assert n_compared >= 10  # the comparison covered real tokens


def test_guidance_with_unit_scales_equals_conditional_sampling():
    model = tiny_model()
    ps = prompts(4)
    uncond = [[72, 78, 77]] * 4
    img_only = [[72, 75] + p[1:3] for p in ps]
    plain = [GenerationRequest(p, "image", seed=10 + i) for i, p in enumerate(ps)]
    three = [GenerationRequest(p, "image", seed=10 + i, uncond_prompt=u, image_cond_prompt=c)
             for i, (p, u, c) in enumerate(zip(ps, uncond, img_only))]
    a = generate(model, None, plain, SamplingConfig(top_p=0.9))
    # uncond + 1·(img − uncond) + 1·(full − img) = full: three streams in one batch, same tokens
    b = generate(model, None, three, SamplingConfig(top_p=0.9, cfg_scale=1.0, image_cfg_scale=1.0))
    assert [x.output for x in a] == [x.output for x in b]
    cond, unc = torch.randn(3, 80), torch.randn(3, 80)
    torch.testing.assert_close(apply_guidance(cond, unc, 1.0), cond)
    torch.testing.assert_close(apply_guidance(cond, unc, 3.0), unc + 3.0 * (cond - unc))


def test_cfg_changes_samples_and_needs_an_uncond_prompt():
    model = tiny_model()
    ps = prompts(6)
    reqs = [GenerationRequest(p, "image", seed=i, uncond_prompt=[72, 78, 77]) for i, p in enumerate(ps)]
    a = generate(model, None, reqs, SamplingConfig(greedy=True))
    b = generate(model, None, reqs, SamplingConfig(greedy=True, cfg_scale=4.0))
    assert [x.output for x in a] != [x.output for x in b]
    with pytest.raises(ValueError, match="unconditional prompt"):
        generate(model, None, [GenerationRequest(ps[0], "image", seed=0)], SamplingConfig(cfg_scale=3.0))


def test_cdk_candidate_set_limits():
    probs = torch.softmax(torch.randn(5, 50), dim=-1)
    assert cdk_candidate_mask(probs, alpha=1e-12, k=1).all()  # alpha -> 0: the whole vocabulary
    top = cdk_candidate_mask(probs, alpha=1.0, k=1)
    assert torch.equal(top, probs == probs.max(-1, keepdim=True).values)  # alpha = 1: the argmax set
    kth = cdk_candidate_mask(probs, alpha=1.0, k=3)
    assert (kth.sum(-1) == 3).all()  # alpha = 1, k = 3: the top three
    exp, ama = torch.randn(2, 50), torch.randn(2, 50)
    s = cdk_scores(exp, ama, alpha=0.5, k=1)
    keep = torch.isfinite(s)
    ref = torch.log_softmax(exp, -1) - torch.log_softmax(ama, -1)
    torch.testing.assert_close(s[keep], ref[keep])


def test_cdk_and_mix_run_end_to_end():
    model = tiny_model()
    reqs = [GenerationRequest(p, "image", seed=i, uncond_prompt=[72, 78, 77]) for i, p in enumerate(prompts(2))]
    gens = generate(model, None, reqs, SamplingConfig(cdk_alpha=0.1, cdk_k=1, n_candidates=4, mix_cdk_fraction=0.5))
    assert all(len(g.candidates) == 4 for g in gens)
    assert all(len(c) == 9 and all(0 <= x < 32 for x in c) for g in gens for c in g.candidates)


def test_sample_is_identical_alone_and_in_a_batch_of_16():
    model = tiny_model()
    ps = prompts(16, seed=3)
    s = SamplingConfig(temperature=1.0, top_p=0.95, n_candidates=1)
    for modality in ("image", "text"):
        reqs = [GenerationRequest(p, modality, seed=100 + i, max_new_tokens=10) for i, p in enumerate(ps)]
        together = generate(model, None, reqs, s, prompts_per_step=16)
        for i in (0, 7, 15):
            alone = generate(model, None, [reqs[i]], s, prompts_per_step=1)
            assert alone[0].candidates == together[i].candidates
        assert len({tuple(g.output) for g in together}) > 1  # different seeds, different samples


def test_image_spans_hold_exactly_n_codes_and_text_no_codes():
    model = tiny_model()
    reqs = [GenerationRequest(p, "image", seed=i) for i, p in enumerate(prompts(5))]
    for g in generate(model, None, reqs, SamplingConfig(temperature=2.0)):
        assert len(g.output) == model.config.image_seq_len
        assert all(0 <= c < model.config.image_codebook_size for c in g.output)
    texts = generate(model, None, [GenerationRequest(p, "text", seed=i, max_new_tokens=15)
                                   for i, p in enumerate(prompts(5))], SamplingConfig(temperature=2.0))
    image_ids = set(model.config.image_token_id_tensor().tolist())
    assert all(not (set(g.output) & image_ids) and len(g.output) <= 15 for g in texts)


def test_nan_logits_raise_a_clear_error():
    model = tiny_model()
    with torch.no_grad():
        model.layers[0].feed_forward.w2.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits"):
        generate(model, None, [GenerationRequest(prompts(1)[0], "text", seed=0)], SamplingConfig())


def test_uniforms_are_a_function_of_seed_candidate_step():
    assert sample_uniform(1, 0, 5) == sample_uniform(1, 0, 5)
    xs = {sample_uniform(1, c, t) for c in range(4) for t in range(50)}
    assert len(xs) == 200 and all(0 <= x < 1 for x in xs)


def test_rerank_keeps_all_candidates_and_marks_the_best():
    model = tiny_model()
    gens = generate(model, None, [GenerationRequest(prompts(1)[0], "image", seed=3)], SamplingConfig(n_candidates=4))
    rerank(gens, lambda i, cands: [sum(c) for c in cands])
    g = gens[0]
    assert len(g.candidates) == 4 and g.scores[g.best] == max(g.scores)


def test_continuation_logprobs_equal_a_token_by_token_sum_and_ignore_left_padding():
    model = tiny_model()
    ps, cont = prompts(5, seed=3), [5, 17, 2, 73]
    got = continuation_logprobs(model, ps, cont, pad_id=74)
    for p, g in zip(ps, got):  # reference: each prompt alone, unpadded, one log-softmax per step
        ids = torch.tensor([p + cont])
        logp = torch.log_softmax(model(ids)[0].float(), -1)
        want = sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(cont))
        assert g == pytest.approx(want, abs=1e-4)
    assert len(set(round(x, 4) for x in got)) > 1  # different prompts, different scores
    with pytest.raises(ValueError, match="empty"):
        continuation_logprobs(model, [[]], cont)
    with pytest.raises(ValueError, match="continuation"):
        continuation_logprobs(model, ps, [])
