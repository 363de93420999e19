"""The real predictor end to end through the engine and the command line, on a tiny
random-weight cm3leon checkpoint built in the test (native folder format): outputs, reranking,
retrieval, shots, resume and batch-size independence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest



def lines(task_dir: Path) -> list[dict]:
    out = []
    for p in sorted((task_dir / "samples").glob("rank-*.jsonl")):
        out += [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return out

# ----------------------------------------------------------------------------- the real predictor
@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    from tasks.shapes import world as shapes_world

    root = tmp_path_factory.mktemp("shapes")
    shapes_world.write_world(shapes_world.generate_world(shapes_world.WorldConfig(n_train=16, n_val=2, n_test=4, questions_per_image=2)), root)
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, shapes_root) -> Path:
    """A random-weight cm3leon checkpoint in the native folder format: tokenizer trained on the
    world's text, a 16-px VQ (16 codes per image), a 1-layer decoder and a small dual encoder."""
    import torch

    from cm3leon import checkpoint
    from cm3leon.config import ModelConfig
    from cm3leon.encoder import NativeDualEncoder, NativeEncoderConfig
    from cm3leon.text import TextTokenizer
    from cm3leon.transformer import Transformer
    from cm3leon.vq import VQConfig, VQModel

    corpus = []
    for f in (shapes_root / "annotations").glob("captions_*.json"):
        corpus += [a["caption"] for a in json.loads(f.read_text())["annotations"]]
    for f in (shapes_root / "vqa").glob("*_questions.json"):
        corpus += [q["question"] for q in json.loads(f.read_text())["questions"]]
    torch.manual_seed(0)
    tok = TextTokenizer.train(corpus, n_text=300, image_codebook_size=16)
    vq = VQModel(VQConfig(resolution=16, base_channels=32, channel_multiplier=[1, 2, 2], num_res_blocks=1,
                          attn_resolutions=[], latent_channels=32, embed_dim=8, num_embeddings=16)).eval()
    cfg = ModelConfig(**tok.model_config_fields(), image_seq_len=16, d_model=32, n_layers=1, n_heads=2,
                      max_seq_len=512)
    enc = NativeDualEncoder(NativeEncoderConfig(image_size=16, image_channels=(8, 16), text_dim=16, text_layers=1,
                                                text_heads=2, dim=16)).eval()
    bundle = checkpoint.ModelBundle(cfg, Transformer(cfg).eval(), tok, vq, 16, encoder=enc)
    return checkpoint.save(bundle, tmp_path_factory.mktemp("ckpt") / "tiny")


def _real_run(args, monkeypatch, capsys):
    from evals.cli import main

    capsys.readouterr()
    code = main(["run", *args, "--json"])  # no injected predictor: the real one on the checkpoint
    got = capsys.readouterr()
    assert code == 0, (got.out[-2000:], got.err[-2000:])
    return json.loads(got.out)


def test_real_predictor_end_to_end_on_a_tiny_model(tmp_path, shapes_root, tiny_model, monkeypatch, capsys):
    out = tmp_path / "run"
    common = ["--model", str(tiny_model), "--data-root", str(shapes_root), "--limit", "4", "--out", str(out)]
    res = _real_run(["shapes-fid", "shapes-vqa", "shapes-edit", *common, "--batch-size", "3",
                     "--set", "metrics.fid.feature_space=model", "--set", "metrics.rank_accuracy.encoder=model",
                     "--set", "metrics.clip_i.encoder=model", "--set", "metrics.clip_t.encoder=model",
                     "--candidates", "2", "--set", "generation.rerank=true", "--save-candidates"],
                    monkeypatch, capsys)[str(out)]
    fid = res["shapes-fid"]["metrics"]
    assert "FD-native" in fid and "FID" not in fid and "t2i_R@1" in fid  # an encoder's space is never "FID"
    assert 0 <= res["shapes-vqa"]["metrics"]["accuracy"]["value"] <= 100
    assert {"L1", "L2 (MSE)", "DEMO-I", "DEMO-T"} <= set(res["shapes-edit"]["metrics"])
    assert all(not r["failures"] for r in res.values())
    for r in lines(out / "shapes-fid"):  # two candidates, reranked by the encoder, the best one kept
        assert len(r["candidates"]) == 2 and len(r["scores"]) == 2 and r["best"] == max((0, 1), key=lambda j: r["scores"][j])
        from PIL import Image

        with Image.open(out / "shapes-fid" / r["images"]["output"]) as im:
            assert im.size == (16, 16)
    for r in lines(out / "shapes-vqa"):
        assert isinstance(r["prediction"], str) and r["prompt"].startswith("Question: ")
    # the same command resumes without recomputing anything, and batch size does not change results
    again = _real_run(["shapes-vqa", *common[:-2], "--out", str(tmp_path / "b1"), "--batch-size", "1"], monkeypatch, capsys)
    assert [r["prediction"] for r in lines(tmp_path / "b1" / "shapes-vqa")] == \
        [r["prediction"] for r in lines(out / "shapes-vqa")]
    assert again[str(tmp_path / "b1")]["shapes-vqa"]["metrics"] == res["shapes-vqa"]["metrics"]


def test_lm_scorer_reranks_by_caption_likelihood(tmp_path, shapes_root, tiny_model, monkeypatch, capsys):
    """scorer=lm: each candidate's score is log p(caption + eos | candidate image) under the decoder
    itself (the math is tested in test_sampling; here: what reaches it and what comes back)."""
    import evals.predictor as predict
    from cm3leon import checkpoint

    real, calls = predict.continuation_logprobs, []

    def spy(model, prompts, continuation, **kw):
        calls.append((prompts, continuation))
        return real(model, prompts, continuation, **kw)

    monkeypatch.setattr(predict, "continuation_logprobs", spy)
    out = tmp_path / "run"
    _real_run(["shapes-fid", "--model", str(tiny_model), "--data-root", str(shapes_root), "--limit", "3",
               "--out", str(out), "--set", "metrics.fid.feature_space=model",
               "--set", "metrics.rank_accuracy.encoder=model", "--candidates", "3",
               "--set", "generation.rerank=true", "--set", "generation.scorer=lm"], monkeypatch, capsys)
    b = checkpoint.load(tiny_model)
    rows = lines(out / "shapes-fid")
    assert len(rows) == 3 and len(calls) == 3
    by_caption = {tuple(cont): prompts for prompts, cont in calls}
    for r in rows:
        cont = tuple(b.tokenizer.encode(r["prompt"]) + [b.config.eos_id])
        prompts = by_caption[cont]  # the caption itself, after each candidate image
        assert len(prompts) == 3 and all(p[-1] == b.config.break_id and b.config.boi_id in p for p in prompts)
        assert len(set(map(tuple, prompts))) > 1  # three different candidates were scored
        assert all(x <= 0 for x in r["scores"])  # log-probabilities
        assert r["best"] == max(range(3), key=lambda j: (r["scores"][j], -j))


def test_real_predictor_with_retrieval_and_shots(tmp_path, shapes_root, tiny_model, monkeypatch, capsys):
    from cm3leon import checkpoint
    from cm3leon.retrieval import MemoryBank, RetrievalDoc

    bundle = checkpoint.load(tiny_model)
    train = json.loads((shapes_root / "annotations" / "captions_train.json").read_text())
    names = {im["id"]: im["file_name"] for im in train["images"]}
    docs = [RetrievalDoc(id=str(a["id"]), text=a["caption"], image_path=f"images/train/{names[a['image_id']]}")
            for a in train["annotations"][::5]]
    bank_dir = tmp_path / "bank"
    MemoryBank.build(docs, bundle.encoder, out_dir=bank_dir, image_root=shapes_root, progress=False)
    out = tmp_path / "run"
    common = ["--model", str(tiny_model), "--data-root", str(shapes_root), "--limit", "3", "--out", str(out)]
    res = _real_run(["shapes-fid", "shapes-vqa", *common, "--set", "retrieval.enabled=true",
                     "--set", f"retrieval.bank={bank_dir}", "--retrieval-k", "2", "--set", "prompt.k_shot=1",
                     # a random encoder puts everything close together: keep the diversity filter out of the way
                     "--set", "retrieval.max_similarity=1.0",
                     "--set", "metrics.fid.feature_space=model", "--set", "metrics.rank_accuracy.encoder=model"],
                    monkeypatch, capsys)[str(out)]
    assert not res["shapes-fid"]["failures"] and not res["shapes-vqa"]["failures"]
    for task in ("shapes-fid", "shapes-vqa"):
        for r in lines(out / task):
            assert len(r["retrieved"]) == 2 and all(d["text"] and d["image"] for d in r["retrieved"])
            assert len(r["shots"]) == 1
    cfg = json.loads((out / "shapes-fid" / "config.json").read_text())
    assert cfg["hashed"]["predictor"]["bank"]  # the bank's identity is part of the config hash


def test_predictor_encodes_each_image_once_and_prompts_match_the_codec(shapes_root, tiny_model, monkeypatch):
    """VQA asks several questions per image: the predictor VQ-encodes each distinct image once (one
    batched call), and the prompt it builds from cached codes equals the codec's prompt from pixels."""
    from PIL import Image

    from cm3leon import checkpoint
    from cm3leon.document import Document
    from evals.protocol import Batch, Item
    from evals.predictor import ModelPredictor, sampling_config
    import tasks
    from tasks.loaders import load_dataset

    spec = tasks.get("shapes-vqa")
    samples = load_dataset(spec, shapes_root).samples[:6]
    for i, s in enumerate(samples):
        s.seed = i
    images = {s.image: Image.open(shapes_root / s.image).convert("RGB") for s in samples}
    assert len(images) < len(samples)  # the fixture repeats images across questions
    pred = ModelPredictor(checkpoint.load(tiny_model))
    calls = []
    real = pred.codec.image_codes
    monkeypatch.setattr(pred.codec, "image_codes", lambda ims: calls.append(len(ims)) or real(ims))
    items = [Item(sample=s, images={"image": images[s.image].copy()}) for s in samples]
    outs = pred.predict(Batch(task=spec, items=items, data_root=shapes_root))
    assert len(outs) == len(samples) and calls == [len(images)]
    pred.predict(Batch(task=spec, items=items[:2], data_root=shapes_root))
    assert calls == [len(images)]  # the second batch hits the cache
    req, _, _ = pred._request(spec, items[0], sampling_config(spec), ([], []))
    text = spec.prompt.template.format(question=samples[0].text)
    assert req.prompt == pred.codec.prompt(Document([images[samples[0].image], text]), "text")
