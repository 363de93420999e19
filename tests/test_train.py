"""The demo recipe end to end at toy scale: every stage runs, the folder loads and generates, a rerun resumes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cm3leon import checkpoint
from cm3leon.document import Document, DocumentCodec
from cm3leon.sampling import GenerationRequest, Sampler, SamplingConfig
from cm3leon.train import (DemoRecipe, Example, ExampleMaker, collate, fill_rows, model_config, pack, train_demo,
                           train_text_tokenizer, tree_forward)
from cm3leon.transformer import Transformer
from tasks.shapes import WorldConfig, generate_world
from tasks.prompts import majority_answer
from tasks.shapes.training import demo_data, t2i_extra_scenes

TINY = DemoRecipe(
    vq_steps=6, vq_batch=4, vq_restart_every=2, vq_codebook=64, vq_kmeans_images=8,
    n_text=300, enc_steps=4, enc_batch=16, enc_text_dim=32, enc_text_layers=1, enc_dim=32,
    d_model=64, n_layers=2, n_heads=2, rows=2, max_seq_len=512, warmup=2,
    pt_steps=30, pt_lr=3e-3, sft_steps=6, sft_lr=1e-3, ckpt_every=4, log_every=5,
)


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldConfig(n_train=40, n_val=4, n_test=4))


def _tokenizer_and_cfg(world):
    data = demo_data(world)
    tok = train_text_tokenizer([c for im in data.images for c in im.captions], 300, 64)
    return data, tok, model_config(tok, dataclasses.replace(TINY, d_model=32, n_heads=2))


def test_majority_answer():
    assert majority_answer(["red"] * 7 + ["orange"] * 3, "red") == "red"
    assert majority_answer(["two"] * 6 + ["2"] * 4, "2") == "two"


def test_tree_packing_matches_separate_sequences(world):
    """A branch sees exactly what the plain sequence prefix + branch would: same logits."""
    torch.manual_seed(0)
    _, tok, cfg = _tokenizer_and_cfg(world)
    model = Transformer(cfg).eval()
    prefix = [cfg.bos_id] + tok.encode("a red circle") + [cfg.break_id]
    b1, b2 = tok.encode("on a white background") + [cfg.eos_id], tok.encode("two shapes") + [cfg.eos_id]
    other = [cfg.bos_id] + tok.encode("a blue square")
    ex = Example(prefix, [(b1, [True] * len(b1)), (b2, [False, True] + [False] * (len(b2) - 2))])
    rows = pack([ex, Example(other, prefix_loss=True)], max_len=64)
    assert len(rows) == 1
    batch = collate(rows, cfg.pad_id)
    with torch.no_grad():
        got = tree_forward(model, batch)
        full1 = model(torch.tensor([prefix + b1]))[0]
        full2 = model(torch.tensor([prefix + b2]))[0]
        full3 = model(torch.tensor([other]))[0]
    P = len(prefix)
    want = torch.cat([full1[P - 1:P - 1 + len(b1)], full2[P:P + 1], full3[:-1]])
    want_targets = b1 + [b2[1]] + other[1:]
    assert batch.targets.tolist() == want_targets
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_compiled_training_forward_matches_eager(world):
    """train_lm's compile_forward path: torch.compile of the layers + head gives the eager logits
    (and gradients) on a packed tree batch, so it changes speed only."""
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++)")
    from cm3leon.train import layers_and_head

    torch.manual_seed(0)
    _, tok, cfg = _tokenizer_and_cfg(world)
    model = Transformer(cfg)
    prefix = [cfg.bos_id] + tok.encode("a red circle") + [cfg.break_id]
    branch = tok.encode("on a white background") + [cfg.eos_id]
    batch = collate(pack([Example(prefix, [(branch, [True] * len(branch))]),
                          Example([cfg.bos_id] + tok.encode("a blue square"), prefix_loss=True)], 64), cfg.pad_id)
    eager = tree_forward(model, batch)
    eager.square().mean().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = tree_forward(model, batch, torch.compile(layers_and_head, dynamic=True))
    got.square().mean().backward()
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)
    for g, w in zip((p.grad for p in model.parameters()), want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)


def test_t2i_extra_scenes_extend_the_train_split_and_feed_only_text_to_image(world):
    extra = t2i_extra_scenes(world.config, 5)
    bigger = generate_world(dataclasses.replace(world.config, n_train=45))
    assert [im.captions for im in extra] == [im.captions for im in bigger.splits["train"].images[40:]]
    assert [im.captions for im in bigger.splits["train"].images[:40]] == [im.captions for im in world.splits["train"].images]
    held_out = {im.scene for s in ("val", "test") for im in world.splits[s].images}
    assert not {im.scene for im in bigger.splits["train"].images[40:]} & held_out
    assert all(not im.qa for im in extra)

    data, tok, cfg = _tokenizer_and_cfg(world)
    data.t2i_extra = extra
    codec = DocumentCodec(tok, None, cfg, 64)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.image_codebook_size, (len(data.images), cfg.image_seq_len), generator=g)
    extra_codes = torch.randint(0, cfg.image_codebook_size, (len(extra), cfg.image_seq_len), generator=g)
    neighbours = torch.stack([(torch.arange(len(data.images)) + d) % len(data.images) for d in (1, 2, 3)], 1)
    recipe = dataclasses.replace(TINY, sft_t2i_retrieval_prob=1.0, cfg_dropout=0.0)
    maker = ExampleMaker(codec, data, codes, codes[:0].reshape(0, 2, cfg.image_seq_len), neighbours, recipe, extra_codes)
    extra_outs = {tuple(codec.codes_to_tokens(c)) for c in extra_codes}
    rng, seen_extra, seen_base = np.random.default_rng(0), 0, 0
    for _ in range(300):
        ex = maker.text_to_image(rng)
        out = tuple(ex.branches[0][0][:cfg.image_seq_len])
        if out in extra_outs:  # an extra scene: its caption alone, never retrieved documents
            seen_extra += 1
            assert ex.prefix.count(cfg.boi_id) == 1
        else:
            seen_base += 1
            assert ex.prefix.count(cfg.boi_id) >= 2  # retrieval prob 1: a retrieved image precedes
    assert seen_extra > 0 and seen_base > 0
    with pytest.raises(ValueError, match="code rows"):
        ExampleMaker(codec, data, codes, codes[:0].reshape(0, 2, cfg.image_seq_len), neighbours, recipe)


def test_demo_build_end_to_end(world, tmp_path, capsys):
    data = demo_data(world)
    assert data.edits and all(len(im.qa) == 5 for im in data.images)
    out = tmp_path / "demo"
    data.t2i_extra = t2i_extra_scenes(world.config, 6)
    summary = train_demo(data, TINY, out)
    assert summary["stages_run"] == ["vq", "tokenizer", "encoder", "index", "extra", "pretrain", "sft"]
    losses = [loss for _, loss in summary["losses"]["pretrain"]]
    assert losses[-1] < losses[0] - 0.5, losses

    bundle = checkpoint.load(out)
    assert bundle.encoder is not None and bundle.bank_dir is not None and bundle.vq is not None
    cfg = bundle.config
    assert cfg.image_seq_len == 36 and cfg.image_codebook_size == 64  # 48 px VQ input, f=8: 6x6 codes
    assert bundle.image_resolution == TINY.vq_resolution == 48
    codec = DocumentCodec(bundle.tokenizer, bundle.vq, cfg, bundle.image_resolution)
    sampler = Sampler(bundle.model, cfg)
    im = data.images[0]
    img, = sampler.generate([GenerationRequest(codec.text_to_image_prompt(im.captions[0]), "image", 1,
                                               uncond_prompt=codec.uncond_image_prompt())],
                            SamplingConfig(top_p=0.9, cfg_scale=3.0))
    cap, = sampler.generate([GenerationRequest(codec.image_to_text_prompt(im.image), "text", 2, max_new_tokens=8)],
                            SamplingConfig(greedy=True))
    assert len(img.output) == 36 and all(0 <= c < 64 for c in img.output)
    assert codec.decode_images([img.output])[0].size == (48, 48)
    assert 1 <= len(cap.output) <= 8
    assert isinstance(bundle.tokenizer.decode(cap.output), str)

    # the bank ships with the model and retrieval works against it with the shipped encoder
    from cm3leon.retrieval import MemoryBank, RetrievalDoc, Retriever

    bank = MemoryBank.load(bundle.bank_dir)
    assert len(bank) == len(data.images)
    docs = Retriever(bank, bundle.encoder).augment(RetrievalDoc(id="q", text=im.captions[1]), k=2)
    # a 40-image bank can hold fewer than k documents that pass the diversity rule
    assert 1 <= len(docs) <= 2 and all(d.image is not None for d in docs)
    codec.text_to_image_prompt(im.captions[1], [Document([d.text, d.image]) for d in docs])

    # rerun: every stage is done, nothing trains again, same weights
    again = train_demo(data, TINY, out)
    assert again["stages_run"] == []
    assert "skipped" in capsys.readouterr().out
    w0 = bundle.model.state_dict()["output.weight"]
    assert torch.equal(checkpoint.load(out).model.state_dict()["output.weight"], w0)

    # a different recipe is refused instead of mixing two builds, as a one-line user-facing error
    from cm3leon.errors import Cm3evalError

    with pytest.raises(ValueError, match="--fresh") as err:
        train_demo(data, dataclasses.replace(TINY, pt_lr=1e-4), out)
    assert isinstance(err.value, Cm3evalError) and "pt_lr" in str(err.value) and "\n" not in str(err.value)


def test_lm_stage_resumes_mid_stage(world, tmp_path, monkeypatch):
    """Killed after a step checkpoint, the LM stage continues from it and ends where an uninterrupted run ends."""
    import cm3leon.train.lm as tr  # the module whose train_lm draws the batches

    data = demo_data(world)
    recipe = dataclasses.replace(TINY, pt_steps=8, sft_steps=2)
    a = train_demo(data, recipe, tmp_path / "a")
    calls = {"n": 0}
    real = tr.fill_rows

    def dying(*args, **kwargs):  # the 6th batch of pretraining: after the step-4 checkpoint
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "fill_rows", dying)
    with pytest.raises(KeyboardInterrupt):
        train_demo(data, recipe, tmp_path / "b")
    monkeypatch.undo()
    assert (tmp_path / "b" / "work" / "pretrain.ckpt.pt").is_file()
    resumed = train_demo(data, recipe, tmp_path / "b")
    assert resumed["stages_run"] == ["pretrain", "sft"]  # vq .. extra were done before the kill
    ref, got = checkpoint.load(tmp_path / "a").model.state_dict(), checkpoint.load(tmp_path / "b").model.state_dict()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)
    assert resumed["losses"]["pretrain"][-1][1] == pytest.approx(a["losses"]["pretrain"][-1][1], rel=1e-4)


def test_untrained_baseline_keeps_every_part_but_the_decoder(tmp_path):
    from typer.testing import CliRunner

    from cm3leon import checkpoint
    from evals.cli import app

    out = tmp_path / "untrained"
    res = CliRunner().invoke(app, ["train", "untrained", "--out", str(out)])
    assert res.exit_code == 0, res.output
    src, new = checkpoint.load("demo"), checkpoint.load(out)
    assert new.config == src.config
    demo_dir = checkpoint.ALIASES["demo"]
    assert (out / "tokenizer.json").read_bytes() == (demo_dir / "tokenizer.json").read_bytes()
    for a, b in ((src.vq, new.vq), (src.encoder, new.encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    sa, sb = src.model.state_dict(), new.model.state_dict()
    assert sa.keys() == sb.keys() and not torch.equal(sa["tok_embeddings.weight"], sb["tok_embeddings.weight"])
    assert sorted(p.name for p in (out / "bank").iterdir()) == sorted(
        p.name for p in (checkpoint.ALIASES["demo"] / "bank").iterdir())
    again = CliRunner().invoke(app, ["train", "untrained", "--out", str(out)])
    assert again.exit_code == 1 and "not empty" in again.output


def test_default_vq_grid_lines_up_with_the_world_layout():
    """At the recipe's VQ resolution every shape of the world falls inside its own cell's block of
    codes (2x2 of the 6x6 grid): a code never mixes two cells, which is what lets 256 codes name
    shape quarters exactly instead of arbitrary cuts through shapes (see DemoRecipe.vq_resolution)."""
    from cm3leon.vq import preprocess
    from tasks.shapes import KINDS, SIZES, Shape, ShapeScene, render

    recipe = DemoRecipe()
    grid = recipe.vq_config().latent_size
    assert grid % 3 == 0, f"a {grid}x{grid} code grid cannot split 3x3 cells evenly"
    per_cell = recipe.vq_resolution // 3
    for kind in KINDS:
        for size in SIZES:
            for row in range(3):
                for col in range(3):
                    scene = ShapeScene("black", (Shape(row, col, kind, "yellow", size),))
                    x = preprocess(render(scene, recipe.image_resolution), recipe.vq_resolution)[0]
                    ink = ((x + 1).abs().amax(0) > 0.1).nonzero()  # pixels visibly off the black background
                    assert len(ink) > 0
                    assert (ink[:, 0] // per_cell == row).all() and (ink[:, 1] // per_cell == col).all(), \
                        (kind, size, row, col)


def test_shipped_demo_model_is_what_the_default_recipe_builds():
    """zoo/shapes-demo records the recipe that built it; it must be today's DemoRecipe(), so that
    `cm3eval train demo` rebuilds the shipped model and not an older one."""
    import json

    folder = checkpoint.ALIASES["demo"]
    recipe = DemoRecipe()
    assert json.loads((folder / "recipe.json").read_text()) == recipe.identity()
    bundle = checkpoint.load("demo")
    assert bundle.image_resolution == recipe.vq_resolution
    assert bundle.vq.config.to_dict() == recipe.vq_config().to_dict()
    assert bundle.config.image_seq_len == (recipe.vq_resolution // bundle.vq.config.downsample_factor) ** 2 == 36
    assert (bundle.config.d_model, bundle.config.n_layers) == (recipe.d_model, recipe.n_layers)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 25e6, f"the shipped demo model is {size / 1e6:.1f} MB (limit 25 MB with its bank)"


def test_train_commands_defer_their_heavy_imports():
    """evals/cli/train.py imports only the standard library and typer at module level (torch, cm3leon
    and tasks load inside the commands), so mounting it keeps `cm3eval --help` fast."""
    import ast
    from pathlib import Path

    import evals.cli.train as module

    tree = ast.parse(Path(module.__file__).read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top.add(node.module.split(".")[0])
    assert top <= {"__future__", "json", "os", "time", "pathlib", "typing", "typer"}, top
    assert {c.name for c in module.train_app.registered_commands} == {"demo", "untrained"}


def test_the_split_package_keeps_the_public_names():
    """cm3leon.train is a package now (one module per stage); its old public names still import from it."""
    import cm3leon.train as tr
    from cm3leon.train import DemoData, DemoEdit, DemoImage, DemoRecipe, quick_eval, train_demo  # noqa: F401

    assert tr.train_demo.__module__ == "cm3leon.train.build" and tr.quick_eval.__module__ == "cm3leon.train.check"
    assert tr.train_vq.__module__ == "cm3leon.train.vq" and tr.train_lm.__module__ == "cm3leon.train.lm"
    assert set(tr.__all__) <= set(dir(tr))
