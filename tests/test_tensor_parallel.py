"""Tensor parallelism on CPU (gloo): 2 ranks give the logits of 1 (<= 1e-5) and the same sampled tokens."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cm3leon.config import ModelConfig
from cm3leon.sampling import GenerationRequest, Sampler, SamplingConfig
from cm3leon.tensor_parallel import TensorParallelError, check_tp
from cm3leon.transformer import Transformer

TP = 2


def build() -> Transformer:
    # Chameleon-style: GQA (4 query heads over 2 KV heads), per-head qk-norm, swiglu
    cfg = ModelConfig(vocab_size=80, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                      qk_norm=True, image_codebook_size=32, image_seq_len=9, image_token_offset=40,
                      bos_id=72, eos_id=73, pad_id=74, boi_id=75, eoi_id=76, break_id=77, mask_id=78)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:  # non-trivial qk-norm rows, so a wrong head slice would show
                p.add_(0.2 * torch.randn_like(p))
        m.output.weight.mul_(20)
    return m


def run_model(m: Transformer) -> dict:
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 40, (3, 10), generator=g)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[1, :4] = False
    sampler = Sampler(m)
    img = [GenerationRequest([72, 3 + i, 9], "image", seed=i, uncond_prompt=[72, 78]) for i in range(3)]
    txt = [GenerationRequest([72, 5 + i], "text", seed=i, max_new_tokens=12) for i in range(3)]
    with torch.no_grad():
        logits = m(tokens, valid)
        cache = m.new_cache(3, 14)
        m.prefill(tokens, valid, cache)
        step = m.step(torch.tensor([1, 2, 3]), cache)
    return {"logits": logits.tolist(), "step": step.tolist(),
            "image": [x.candidates for x in sampler.generate(img, SamplingConfig(top_p=0.9, cfg_scale=3.0))],
            "text": [x.candidates for x in sampler.generate(txt, SamplingConfig(temperature=0.8))]}


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(TP))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=TP)
    try:
        from cm3leon.tensor_parallel import layout, parallelize
        from evals.dist import Dist

        lay = layout(TP)
        assert (lay.dp_size, lay.dp_rank, lay.tp_rank) == (1, 0, rank)
        assert layout(TP) is lay  # the engine's Dist and the predictor share one mesh (built once)
        group = Dist(rank, TP, tp=TP, tp_group=lay.mesh["tp"].get_group())
        assert group.group_min(8 - rank) == 7  # the batch size both ranks of the copy run (engine._predict_all)
        m = parallelize(build(), lay.mesh["tp"])
        assert m.local_kv_heads == 1 and m.layers[0].attention.q_normalization.weight.shape == (2, 16)
        Path(out, f"rank{rank}.json").write_text(json.dumps(run_model(m)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_give_the_logits_and_tokens_of_one(tmp_path):
    torch.set_num_threads(1)
    single = run_model(build())
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=TP, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(TP)]
    for res in ranks:
        for key in ("logits", "step"):
            torch.testing.assert_close(torch.tensor(res[key]), torch.tensor(single[key]), atol=1e-5, rtol=0)
        assert res["image"] == single["image"] and res["text"] == single["text"]
    assert ranks[0] == ranks[1]  # both ranks of the group hold the very same outputs


def test_tp_that_does_not_divide_the_model_is_a_clear_error():
    cfg = build().config
    check_tp(cfg, 2)
    with pytest.raises(TensorParallelError, match="n_kv_heads=2 is not divisible by tp=4"):
        check_tp(cfg, 4)
    with pytest.raises(TensorParallelError, match="world of 3 ranks"):
        check_tp(cfg, 2, world=3)
