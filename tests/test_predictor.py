"""evals/predictor.py on the shipped demo model: outputs, fatal set-up errors, one sampler step per batch."""

from __future__ import annotations

import dataclasses

import pytest

import tasks
from cm3leon import checkpoint, families
from cm3leon.errors import Cm3evalError
from evals.protocol import Batch, Item
from evals.predictor import ModelPredictor, PredictorSetupError, sampling_config
from tasks.loaders import Sample


@pytest.fixture(scope="module")
def bundle():
    return checkpoint.load("demo")


def _t2i_spec(**gen):
    spec = tasks.get("shapes-fid")
    return dataclasses.replace(spec, generation=dataclasses.replace(spec.generation, **gen))


def _items(n: int) -> list[Item]:
    return [Item(sample=Sample(id=f"s{i}", kind="t2i", text="a red circle", seed=i, index=i), images={})
            for i in range(n)]


def test_every_candidates_codes_are_output_and_only_the_chosen_png(bundle, tmp_path):
    spec = _t2i_spec(n_candidates=3, rerank=True, scorer="lm")
    pred = ModelPredictor(bundle)
    outs = pred.predict(Batch(task=spec, items=_items(2), data_root=tmp_path))
    for out in outs:
        codes = out["extra"]["codes"]
        assert len(codes) == 3 and all(len(c) == bundle.config.image_seq_len for c in codes)
        assert "candidates" not in out  # no PNG per candidate unless asked
        assert len(out["scores"]) == 3 and out["best"] == max(range(3), key=lambda j: (out["scores"][j], -j))
        # the chosen image is the decoding of the chosen codes
        want = pred.codec.decode_images([codes[out["best"]]])[0]
        assert out["images"]["output"].tobytes() == want.tobytes()
    saving = ModelPredictor(bundle, save_candidates=True)
    again = saving.predict(Batch(task=spec, items=_items(2), data_root=tmp_path))
    assert [o["extra"]["codes"] for o in again] == [o["extra"]["codes"] for o in outs]  # batch size, flags: same
    assert all(len(o["candidates"]) == 3 for o in again)


def test_a_predict_call_is_one_sampler_step_over_its_prompts(bundle, tmp_path):
    """The engine's chunk is the plan's prompts per step: predict() runs all its prompts (every
    candidate) as one sampler batch, and the tokens are those of one prompt at a time."""
    spec = _t2i_spec(n_candidates=2, rerank=False)
    pred = ModelPredictor(bundle)
    seen, generate = [], pred.sampler.generate

    def spy(requests, sampling, **kw):
        seen.append((len(requests), kw))
        return generate(requests, sampling, **kw)

    pred.sampler.generate = spy
    together = pred.predict(Batch(task=spec, items=_items(3), data_root=tmp_path))
    alone = [pred.predict(Batch(task=spec, items=[it], data_root=tmp_path))[0] for it in _items(3)]
    assert seen == [(3, {"prompts_per_step": 3})] + [(1, {"prompts_per_step": 1})] * 3
    assert [o["extra"]["codes"] for o in together] == [o["extra"]["codes"] for o in alone]


def test_a_missing_decoder_is_a_fatal_setup_error(bundle, tmp_path):
    no_vq = dataclasses.replace(bundle, vq=None)
    pred = ModelPredictor(no_vq)
    with pytest.raises(PredictorSetupError, match="--vq PATH") as e:
        pred.predict(Batch(task=_t2i_spec(), items=_items(1), data_root=tmp_path))
    assert isinstance(e.value, Cm3evalError)  # the engine stops the run instead of retrying each sample
    with pytest.raises(PredictorSetupError, match="encode input images"):
        pred.check_ready(tasks.get("shapes-vqa"))


def test_a_missing_bank_is_fatal(bundle):
    spec = tasks.get("shapes-fid")
    spec = dataclasses.replace(spec, retrieval=dataclasses.replace(spec.retrieval, enabled=True, k=2,
                                                                   bank="/nonexistent/bank"))
    with pytest.raises(PredictorSetupError, match="bank folder not found"):
        ModelPredictor(bundle).task_fingerprint(spec)


def test_text_decoding_bars_the_family_specials(bundle):
    pred = ModelPredictor(bundle)
    assert pred.family is families.NATIVE
    allowed = pred.sampler.text_allowed
    for tid in pred.codec.text_barred():
        assert not bool(allowed[tid])
    s = bundle.tokenizer.special_ids
    assert bool(allowed[s["eos"]]) and bool(allowed[s["break"]])  # stops stay possible


# ----------------------------------------------------------------------------- a real-layout Chameleon
from chameleon_fixture import chameleon_files  # noqa: E402,F401  (the model helper's HF fixture)


def test_chameleon_checkpoint_through_the_predictor(chameleon_files, tmp_path):
    """A tiny random HF Chameleon (real ids) + Meta's vqgan.ckpt: t2i with CFG and VQA both run,
    in Chameleon's layout, with every <...> special barred from the answer."""
    from PIL import Image

    b = checkpoint.load(chameleon_files.hf, vq=chameleon_files.vq_dir / "vqgan.ckpt")
    pred = ModelPredictor(b)
    assert pred.family is families.CHAMELEON
    eot, boi = b.tokenizer.token_to_id("<reserved08706>"), b.tokenizer.token_to_id("<racm3:break>")
    assert (eot, boi) == (8710, 8197)
    spec = tasks.get("coco-fid")
    spec = dataclasses.replace(spec, retrieval=dataclasses.replace(spec.retrieval, enabled=False),
                               generation=dataclasses.replace(spec.generation, n_candidates=2, rerank=False))
    items = [Item(sample=Sample(id="p", kind="t2i", text="a red dog", seed=5, index=0), images={})]
    req, _, _ = pred._request(spec, items[0], sampling_config(spec), ([], []))
    assert req.prompt[0] == 0 and req.prompt[-2:] == [eot, boi] and req.uncond_prompt == [0, boi]
    out, = pred.predict(Batch(task=spec, items=items, data_root=tmp_path))
    assert len(out["extra"]["codes"]) == 2 and out["images"]["output"].size[0] == b.vq.config.resolution
    vqa = tasks.get("vqav2")
    img = Image.new("RGB", (40, 40), (10, 200, 30))
    q = [Item(sample=Sample(id="q", kind="vqa", text="what color is the dog", seed=1, index=0), images={"image": img})]
    ans, = pred.predict(Batch(task=vqa, items=q, data_root=tmp_path))
    assert isinstance(ans["prediction"], str)
    barred = set(pred.codec.text_barred())
    assert {0, 1, 3, 8196, 8197, 8710, 8711} <= barred and 2 not in barred
