"""Editing metrics (InstructPix2Pix CLIP similarities, MagicBrush L1/L2/DINO, turn settings), DINO ViT-S/16,
and `cm3eval score edit`."""

from __future__ import annotations

import json
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from PIL import Image
from typer.testing import CliRunner

from evals.metrics import dino as dino_mod
from evals.metrics.dino import DinoEncoder, DinoViT, DinoWeightsNotFound, dino_transform, load_dino
from evals.metrics.editing import (
    clip_directional_similarity,
    clip_image_similarity,
    final_turn_indices,
    pixel_distances,
    turn_settings,
)
from evals.metrics.result import mean_result

from real_data import COCO_MINI_IMAGES as COCO


def coco_images(n: int) -> list[Image.Image]:
    if not COCO.is_dir():
        pytest.skip(f"real COCO images not present at {COCO}")
    return [Image.open(p).convert("RGB") for p in sorted(COCO.glob("*.jpg"))[:n]]


class TinyEncoder:
    """Deterministic toy dual encoder: 4x4 thumbnail pixels / hashed character bigrams, unit norm."""

    name, dim = "tiny", 48

    def encode_image(self, images):
        x = np.stack([np.asarray(im.convert("RGB").resize((4, 4), Image.Resampling.BILINEAR), np.float64).ravel()
                      for im in images]) / 255.0 - 0.5
        return F.normalize(torch.from_numpy(x), dim=1)

    def encode_text(self, texts):
        x = np.zeros((len(texts), self.dim)) + 1e-3
        for i, t in enumerate(texts):
            for a, b in zip(t, t[1:]):
                x[i, zlib.crc32((a + b).encode()) % self.dim] += 1.0
        return F.normalize(torch.from_numpy(x), dim=1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------- InstructPix2Pix

def test_directional_similarity_against_numpy():
    rng = np.random.default_rng(0)
    i0, i1, t0, t1 = (rng.normal(size=(9, 16)) for _ in range(4))
    r = clip_directional_similarity(*(torch.from_numpy(x) for x in (i0, i1, t0, t1)))
    di, dt = _unit(i1) - _unit(i0), _unit(t1) - _unit(t0)
    expected = (di * dt).sum(1) / np.linalg.norm(di, axis=1) / np.linalg.norm(dt, axis=1)
    assert r.name == "CLIP-dir" and r.n == 9
    assert r.per_sample == pytest.approx(expected, abs=1e-12)
    assert r.value == pytest.approx(expected.mean(), abs=1e-12)
    s = clip_image_similarity(torch.from_numpy(i0), torch.from_numpy(i1))
    assert s.name == "CLIP-img" and s.value == pytest.approx((_unit(i0) * _unit(i1)).sum(1).mean(), abs=1e-12)


def test_directional_similarity_invariances_on_real_images():
    enc = TinyEncoder()
    src = coco_images(4)
    out = [im.transpose(Image.Transpose.FLIP_TOP_BOTTOM) for im in src]
    caps0 = ["a photo", "a street", "some food", "a room"]
    caps1 = ["a dark photo", "a wet street", "some cold food", "an empty room"]
    # identical input and output: image similarity 1, no image direction -> 0 (F.cosine_similarity's eps), counted
    same = clip_directional_similarity(src, src, caps0, caps1, enc)
    assert same.value == 0.0 and same.extra["n_zero_image_direction"] == 4
    assert clip_image_similarity(src, src, enc).value == pytest.approx(1.0, abs=1e-12)
    # swapping both input/output and the captions leaves the direction's angle unchanged
    fwd = clip_directional_similarity(src, out, caps0, caps1, enc)
    back = clip_directional_similarity(out, src, caps1, caps0, enc)
    assert fwd.per_sample == pytest.approx(back.per_sample, abs=1e-12)
    flip = clip_directional_similarity(src, out, caps1, caps0, enc)  # reversed text direction: sign flips
    assert flip.per_sample == pytest.approx(-fwd.per_sample, abs=1e-12)
    with pytest.raises(ValueError, match="equal counts"):
        clip_directional_similarity(src, out[:3], caps0, caps1, enc)


# ---------------------------------------------------------------- MagicBrush L1 / L2

def _magicbrush_distance(gen: Image.Image, gt: Image.Image, metric: str) -> float:
    """MagicBrush's eval_distance, one pair, line for line (evaluation/image_eval.py)."""
    from torchvision.transforms import ToTensor

    criterion = torch.nn.L1Loss() if metric == "l1" else torch.nn.MSELoss()
    gen, gt = gen.convert("RGB"), gt.convert("RGB")
    gen = gen.resize(gt.size)
    return criterion(ToTensor()(gen), ToTensor()(gt)).item()


def test_pixel_distances_match_magicbrush_on_real_images():
    real = coco_images(6)
    targets = real[:3]
    generated = [real[3].resize((200, 150)), real[4], targets[2].resize((320, 240))]  # differing sizes
    res = pixel_distances(generated, targets)
    assert set(res) == {"L1", "L2 (MSE)"}
    for name, metric in (("L1", "l1"), ("L2 (MSE)", "l2")):
        ref = [_magicbrush_distance(g, t, metric) for g, t in zip(generated, targets)]
        assert res[name].per_sample == pytest.approx(ref, abs=1e-6)
        assert res[name].value == pytest.approx(np.mean(ref), abs=1e-6)
    assert res["L2 (MSE)"].per_sample[2] < res["L2 (MSE)"].per_sample[0]  # a resized copy is closer than another photo
    assert pixel_distances(targets, targets)["L1"].value == 0.0


def test_pixel_distances_without_resize_refuse_mismatched_sizes():
    a, b = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 6))
    with pytest.raises(ValueError, match="sample 1: .*8x8.*8x6"):
        pixel_distances([a, a], [a, b], resize=False)
    with pytest.raises(ValueError, match="equal, non-zero"):
        pixel_distances([a], [a, a])


# ---------------------------------------------------------------- final-turn / all-turn

def test_turn_settings():
    sessions = ["s1", "s1", "s1", "s2", "s3", "s3"]
    turns = [1, 3, 2, 1, 2, 1]
    assert list(final_turn_indices(sessions, turns)) == [1, 3, 4]
    r = mean_result("L1", [0.1, 0.3, 0.2, 0.4, 0.6, 0.5])
    both = turn_settings(r, sessions, turns)
    assert both["final_turn"].value == pytest.approx((0.3 + 0.4 + 0.6) / 3) and both["final_turn"].n == 3
    assert both["all_turn"].value == pytest.approx(r.value) and both["all_turn"].n == 6
    with pytest.raises(ValueError, match="turn 1 twice"):
        final_turn_indices(["a", "a"], [1, 1])
    with pytest.raises(ValueError, match="plain mean"):
        turn_settings(mean_result("R@1", [1.0, 0.0], scale=100), ["a", "b"], [1, 1])


# ---------------------------------------------------------------- DINO ViT-S/16

def official_dino_layout(depth: int = 12) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of dino_deitsmall16_pretrain.pth (DINO's vit_small, no head)."""
    d = 384
    keys = {"cls_token": (1, 1, d), "pos_embed": (1, 197, d), "patch_embed.proj.weight": (d, 3, 16, 16),
            "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                     b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                     b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (4 * d, d),
                     b + "mlp.fc1.bias": (4 * d,), b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
    return keys


def _random_state(depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * (0.05 if len(s) > 1 else 0.2) + (1.0 if "norm" in k and "weight" in k
                                                                              else 0.0)
            for k, s in official_dino_layout(depth).items()}


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dino") / dino_mod.WEIGHTS_FILENAME
    torch.save(_random_state(12), path)
    return path


def test_dino_layout_is_the_official_one():
    got = {k: tuple(v.shape) for k, v in DinoViT().state_dict().items()}
    assert got == official_dino_layout()


def test_dino_matches_transformers_vit_on_real_images():
    from transformers import ViTConfig, ViTModel

    depth = 2
    state = _random_state(depth, seed=1)
    ours = DinoViT(depth=depth).eval()
    ours.load_state_dict(state, strict=True)
    hf = ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=depth, num_attention_heads=6, intermediate_size=1536,
                            image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True),
                  add_pooling_layer=False).eval()
    hf_state = {"embeddings.cls_token": state["cls_token"], "embeddings.position_embeddings": state["pos_embed"],
                "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
                "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
                # DINO's final `norm` is HF's final `layernorm`: both are applied before taking the CLS token
                "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    for i in range(depth):
        b, h = f"blocks.{i}.", f"layers.{i}."
        for part, w in zip(("q_proj", "k_proj", "v_proj"), state[b + "attn.qkv.weight"].chunk(3)):
            hf_state[f"{h}attention.{part}.weight"] = w
        for part, w in zip(("q_proj", "k_proj", "v_proj"), state[b + "attn.qkv.bias"].chunk(3)):
            hf_state[f"{h}attention.{part}.bias"] = w
        for ours_name, hf_name in (("attn.proj", "attention.o_proj"), ("norm1", "layernorm_before"),
                                   ("norm2", "layernorm_after"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for p in ("weight", "bias"):
                hf_state[f"{h}{hf_name}.{p}"] = state[f"{b}{ours_name}.{p}"]
    hf.load_state_dict(hf_state, strict=True)
    tf = dino_transform()
    x = torch.stack([tf(im) for im in coco_images(3)])
    assert x.shape == (3, 3, 224, 224)
    with torch.no_grad():
        a = ours(x)
        b = hf(pixel_values=x).last_hidden_state[:, 0]
    assert a.shape == (3, 384)
    assert (a - b).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match=r"\[B,3,224,224\]"):
        ours(torch.zeros(1, 3, 256, 256))


def test_load_dino_strict_from_file(dino_file, tmp_path):
    model = load_dino(dino_file)
    assert not model.training and model.weights_path == dino_file
    assert torch.equal(model.pos_embed, torch.load(dino_file, weights_only=True)["pos_embed"])
    enc = DinoEncoder(model)
    imgs = coco_images(2)
    e = enc.encode_image(imgs + imgs[:1])
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=1), torch.ones(3, dtype=e.dtype))
    assert torch.allclose(e[0], e[2]) and not torch.allclose(e[0], e[1])

    bad = _random_state(12)
    bad["head.weight"] = torch.zeros(2, 384)
    torch.save(bad, tmp_path / "with_head.pth")
    with pytest.raises(ValueError, match="do not match the dino_vits16 layout"):
        load_dino(tmp_path / "with_head.pth")


def test_missing_dino_weights_error_says_where_and_how(monkeypatch, tmp_path, dino_file):
    monkeypatch.delenv(dino_mod.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(DinoWeightsNotFound) as e:
        load_dino()
    msg = str(e.value)
    assert dino_mod.WEIGHTS_FILENAME in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert dino_mod.WEIGHTS_URL in msg and dino_mod.WEIGHTS_ENV in msg
    with pytest.raises(DinoWeightsNotFound, match="argument"):
        load_dino(tmp_path / "nope.pth")  # an explicit path never falls back to other places
    monkeypatch.setenv(dino_mod.WEIGHTS_ENV, str(dino_file))
    assert dino_mod.find_weights() == dino_file


# ---------------------------------------------------------------- cm3eval score edit

@pytest.fixture()
def edit_dirs(tmp_path) -> Path:
    """MagicBrush-like folders from real photos: source, target (an 'edit'), generated (another size, png)."""
    photos = [im.resize((64, 48)) for im in coco_images(4)]
    for role in ("source", "target", "generated"):
        (tmp_path / role / "139").mkdir(parents=True)
    for i, im in enumerate(photos):
        name = f"139/139-output{i + 1}"
        im.save(tmp_path / "source" / f"{name}.jpg", quality=95)
        tgt = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tgt.save(tmp_path / "target" / f"{name}.png")
        (tgt if i % 2 else im).resize((32, 24)).save(tmp_path / "generated" / f"{name}.png")
    caps = {"139": {f"139-output{i + 1}.png": {"source": f"a photo {i}", "target": f"a mirrored photo {i}"}
                    for i in range(4)}}
    (tmp_path / "captions.json").write_text(json.dumps(caps))
    return tmp_path


def _cli():
    from evals.cli.score import edit

    app = typer.Typer()
    app.command()(edit)
    app.command("noop")(lambda: None)  # two commands so typer keeps the `edit` name
    return app


def _run(args, **env):
    return CliRunner().invoke(_cli(), ["edit", *args], env=env)


def test_score_edit_pixels_only(edit_dirs, tmp_path_factory):
    empty_home = str(tmp_path_factory.mktemp("torch_home"))
    r = _run(["--generated", str(edit_dirs / "generated"), "--target", str(edit_dirs / "target"), "--json"],
             TORCH_HOME=empty_home, CM3EVAL_DINO_WEIGHTS="")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["n_samples"] == 4 and set(out["metrics"]) == {"L1", "L2 (MSE)"}
    keys = sorted(p.relative_to(edit_dirs / "target") for p in (edit_dirs / "target").rglob("*.png"))
    ref = pixel_distances([Image.open(edit_dirs / "generated" / k) for k in keys],
                          [Image.open(edit_dirs / "target" / k) for k in keys])
    assert out["metrics"]["L1"]["value"] == pytest.approx(ref["L1"].value, abs=1e-12)
    assert out["skipped"]["DINO"].startswith("weights not present")
    assert out["skipped"]["CLIP-I"] == "no --encoder given"


def test_score_edit_with_encoder_and_dino(edit_dirs, dino_file, monkeypatch):
    fake = types.ModuleType("cm3leon.encoder")
    fake.load_encoder = lambda spec, device="cpu": TinyEncoder() if spec == "tiny:" else (_ for _ in ()).throw(ValueError("bad"))
    monkeypatch.setitem(sys.modules, "cm3leon.encoder", fake)
    r = _run(["--source", str(edit_dirs / "source"), "--generated", str(edit_dirs / "generated"),
              "--target", str(edit_dirs / "target"), "--captions", str(edit_dirs / "captions.json"),
              "--encoder", "tiny:", "--dino-weights", str(dino_file), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out["metrics"]) == {"L1", "L2 (MSE)", "DINO", "CLIP-I", "CLIP-img", "CLIP-T", "CLIP-dir"}
    assert out["skipped"] == {}
    assert all(m["n"] == 4 and -1 <= m["value"] <= 1 for k, m in out["metrics"].items() if k.startswith(("CLIP", "D")))
    # the same number from the metric functions directly
    keys = sorted(p.relative_to(edit_dirs / "target") for p in (edit_dirs / "target").rglob("*.png"))
    gen = [Image.open(edit_dirs / "generated" / k) for k in keys]
    tgt = [Image.open(edit_dirs / "target" / k) for k in keys]
    from evals.metrics.clip_score import clip_i

    assert out["metrics"]["CLIP-I"]["value"] == pytest.approx(clip_i(gen, tgt, TinyEncoder()).value, abs=1e-9)
    assert out["metrics"]["DINO"]["value"] == pytest.approx(
        clip_i(gen, tgt, DinoEncoder(load_dino(dino_file))).value, abs=1e-6)

    r = _run(["--generated", str(edit_dirs / "generated"), "--target", str(edit_dirs / "target"),
              "--encoder", "nope", "--dino-weights", str(dino_file)])
    assert r.exit_code == 2 and "--encoder 'nope': bad" in r.output


def test_score_edit_errors(edit_dirs, monkeypatch):
    (edit_dirs / "generated" / "139" / "139-output2.png").unlink()
    (edit_dirs / "generated" / "139" / "139-output4.png").unlink()
    r = _run(["--generated", str(edit_dirs / "generated"), "--target", str(edit_dirs / "target")])
    assert r.exit_code == 2
    assert "2 target image(s) have no generated counterpart: 139/139-output2, 139/139-output4" in r.output

    r = _run(["--generated", str(edit_dirs / "generated"), "--target", str(edit_dirs / "target"),
              "--dino-weights", str(edit_dirs / "missing.pth")])
    assert r.exit_code == 2 and "dino_deitsmall16_pretrain.pth not found" in r.output

    monkeypatch.setitem(sys.modules, "cm3leon.encoder", None)  # as if the module did not exist
    r = _run(["--generated", str(edit_dirs / "target"), "--target", str(edit_dirs / "target"), "--encoder", "x"])
    assert r.exit_code == 2 and "needs cm3leon.encoder" in r.output
