"""The decode loop never waits on the device: 0 host reads per step, <= 1 per 16 steps for text."""

from __future__ import annotations

import math

import torch

from cm3leon.config import ModelConfig
from cm3leon.host_syncs import count_host_syncs
from cm3leon.sampling import GenerationRequest, Sampler, SamplingConfig
from cm3leon.transformer import Transformer


def model(vocab: int = 80) -> Transformer:
    cfg = ModelConfig(vocab_size=vocab, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
                      qk_norm=True, image_codebook_size=32, image_seq_len=20, image_token_offset=40,
                      bos_id=72, eos_id=73, pad_id=74, boi_id=75, eoi_id=76, break_id=77, mask_id=78)
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def instrumented(sampler: Sampler, counter):
    """Wrap the step and the decode call; return lists that collect the reads made inside each."""
    per_step, per_decode, steps = [], [], []
    step_fn, decode = sampler._step_fn, sampler.decode

    def step(*args):
        counter.mark()
        step_fn(*args)
        per_step.append(counter.mark())

    def run(state, plan, batch):
        before = counter.total
        n = len(per_step)
        decode(state, plan, batch)
        per_decode.append(counter.total - before)
        steps.append(len(per_step) - n)

    sampler._step_fn, sampler.decode = step, run
    return per_step, per_decode, steps


def run_counted(sampler: Sampler, reqs, sampling: SamplingConfig, prompts_per_step: int):
    with count_host_syncs() as counter:
        per_step, per_decode, steps = instrumented(sampler, counter)
        gens = sampler.generate(reqs, sampling, prompts_per_step=prompts_per_step)
    return gens, per_step, per_decode, steps


def test_image_decoding_with_cfg_reads_nothing_back_per_step():
    m = model()
    sampler = Sampler(m)
    reqs = [GenerationRequest([72, 3, 4, 5 + i, 75], "image", seed=i, uncond_prompt=[72, 78, 75]) for i in range(4)]
    gens, per_step, per_decode, steps = run_counted(sampler, reqs, SamplingConfig(top_p=0.9, cfg_scale=3.0), 4)
    assert len(gens[0].output) == 20
    assert steps == [20] and per_step == [0] * 20  # the wrap saw every step, and none read the device
    assert per_decode == [0]  # an image batch's loop makes no host read at all


def test_text_decoding_reads_one_flag_per_16_steps():
    m = model(vocab=2100)  # a vocabulary larger than the top-p prefilter, so that path runs too
    n_new = 64
    reqs = [GenerationRequest([72, 3, 4 + i], "text", seed=i, max_new_tokens=n_new) for i in range(3)]
    for sampling in (SamplingConfig(top_p=0.9, temperature=0.7), SamplingConfig(greedy=True)):
        sampler = Sampler(m, text_barred=[73, 77, 75, 74])  # no stop token: every row runs its full budget
        sampler.stop_ids = sampler.stop_ids[:0]
        gens, per_step, per_decode, steps = run_counted(sampler, reqs, sampling, 3)
        assert all(len(g.output) == n_new for g in gens)
        assert per_step and set(per_step) == {0}
        assert all(reads <= math.ceil(n / 16) for reads, n in zip(per_decode, steps)), (per_decode, steps)


def test_text_stop_is_found_at_the_next_flag_read_and_cut_exactly():
    m = model()
    sampler = Sampler(m)
    reqs = [GenerationRequest([72, 3, 4 + i], "text", seed=i, max_new_tokens=200) for i in range(6)]
    gens, per_step, per_decode, steps = run_counted(sampler, reqs, SamplingConfig(temperature=3.0), 6)
    # with a flat distribution every row hits a stop token early; the loop ends within 16 steps of the last
    longest = max(len(g.output) + (1 if f else 0) for g in gens for f in g.finished)
    assert all(g.finished == [True] for g in gens)
    assert steps[0] <= -(-longest // 16) * 16 < 200
    assert per_decode[0] <= math.ceil(steps[0] / 16)
