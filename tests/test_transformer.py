"""The decoder: KV-cache decoding equals a full forward pass on left-padded batches."""

import pytest
import torch

from cm3leon.config import ModelConfig
from cm3leon.transformer import Transformer

VARIANTS = {
    "chameleon": dict(norm="rmsnorm", pos_encoding="rope", qk_norm=True, mlp="swiglu", n_kv_heads=2),
    "cm3leon": dict(norm="layernorm", norm_affine=False, pos_encoding="learned", mlp="gelu"),
    "swin": dict(norm="rmsnorm", pos_encoding="rope", qk_norm=True, swin_norm=True, mlp="swiglu"),
}


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
                      image_codebook_size=16, image_token_offset=60, **kw)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm parameters so the test sees their layout
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def left_pad(seqs, pad=0):
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, T - len(s):] = torch.tensor(s)
        valid[i, T - len(s):] = True
    return tokens, valid


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_and_steps_match_full_forward(variant):
    model = tiny(**VARIANTS[variant])
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (12, 7, 3)]
    n_prompt = [n - 4 for n in (12, 7, 3)]
    n_prompt[2] = 1
    prompts = [s[:k] for s, k in zip(seqs, n_prompt)]
    # reference: each sequence alone, no padding, one full forward
    with torch.no_grad():
        ref = [model(torch.tensor([s]))[0] for s in seqs]
        tokens, valid = left_pad(prompts)
        cache = model.new_cache(3, tokens.shape[1] + 4)
        logits = model.prefill(tokens, valid, cache)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(logits[i, -1], ref[i][len(p) - 1], atol=1e-5, rtol=0)
        for t in range(4):
            nxt = torch.tensor([s[len(p) + t] if len(p) + t < len(s) else 1 for s, p in zip(seqs, prompts)])
            step_logits = model.step(nxt, cache)
            for i, (s, p) in enumerate(zip(seqs, prompts)):
                if len(p) + t < len(s):
                    torch.testing.assert_close(step_logits[i], ref[i][len(p) + t], atol=1e-5, rtol=0)


def test_padding_does_not_change_a_row():
    model = tiny(**VARIANTS["chameleon"])
    s = [5, 9, 13, 2, 40]
    with torch.no_grad():
        alone = model(torch.tensor([s]))[0, -1]
        tokens, valid = left_pad([s, list(range(1, 20))])
        padded = model(tokens, valid)[0, -1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=0)


def test_cache_overflow_is_a_clear_error():
    model = tiny()
    cache = model.new_cache(1, 4)
    with torch.no_grad():
        model.prefill(torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.bool), cache)
        with pytest.raises(ValueError, match="full"):
            model.step(torch.tensor([5]), cache)


def test_invalid_config_names_the_problem():
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(d_model=65, n_heads=4)


@pytest.mark.parametrize("variant", ["chameleon", "cm3leon"])
def test_a_fixed_kv_bucket_gives_the_filled_slots_logits_without_host_reads(variant):
    from cm3leon.host_syncs import count_host_syncs

    model = tiny(**VARIANTS[variant])  # chameleon: 4 query heads over 2 KV heads (SDPA's enable_gqa)
    tokens, valid = left_pad([[5, 9, 13, 2], [7, 1]])
    with torch.no_grad():
        exact, bucketed = model.new_cache(2, 16), model.new_cache(2, 16)
        model.prefill(tokens, valid, exact)
        model.prefill(tokens, valid, bucketed)
        for t in range(5):
            nxt = torch.tensor([3 + t, 11 + t])
            want = model.step(nxt, exact)
            with count_host_syncs() as reads:
                got = model.step(nxt, bucketed, kv_len=16)  # attends over all 16 slots, unfilled ones masked
            assert reads.total == 0
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert exact.length == bucketed.length == 9 and int(bucketed.slot) == 9
        with pytest.raises(ValueError, match="kv_len"):
            model.step(nxt, bucketed, kv_len=9)  # must cover the slot being written


def test_positions_past_max_seq_len_are_refused_from_host_counts():
    model = tiny()  # max_seq_len 64
    cache = model.new_cache(2, 80)
    tokens, valid = left_pad([list(range(1, 64)), [4, 5]])
    with torch.no_grad():
        model.prefill(tokens, valid, cache)
        model.step(torch.tensor([1, 2]), cache)  # position 63: the last one
        with pytest.raises(ValueError, match="position 64 exceeds max_seq_len=64"):
            model.step(torch.tensor([1, 2]), cache)
