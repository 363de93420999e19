"""CLIPScore (both conventions, parity with torchmetrics), CLIP-I, CLIP-T, text->image rank accuracy."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evals.metrics.clip_score import clip_i, clip_score, clip_t, rank_pools, t2i_rank_accuracy

from real_data import COCO_MINI as COCO


def coco_samples(n: int) -> tuple[list[Image.Image], list[str]]:
    """n real COCO val2017 images with their first caption."""
    if not (COCO / "val2017").is_dir():
        pytest.skip(f"real COCO images not present at {COCO}")
    ann = json.loads((COCO / "annotations" / "captions_val2017.json").read_text())
    first: dict[int, str] = {}
    for a in ann["annotations"]:
        first.setdefault(a["image_id"], a["caption"].strip())
    images = sorted(ann["images"], key=lambda im: im["id"])[:n]
    return [Image.open(COCO / "val2017" / im["file_name"]).convert("RGB") for im in images], \
        [first[im["id"]] for im in images]


class TinyEncoder:
    """Deterministic toy dual encoder: 4x4 thumbnail pixels / hashed character bigrams, unit norm."""

    name, dim = "tiny", 48

    def encode_image(self, images: list[Image.Image]) -> torch.Tensor:
        x = np.stack([np.asarray(im.convert("RGB").resize((4, 4), Image.Resampling.BILINEAR), np.float64).ravel()
                      for im in images]) / 255.0 - 0.5
        return torch.nn.functional.normalize(torch.from_numpy(x), dim=1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        x = np.zeros((len(texts), self.dim)) + 1e-3
        for i, t in enumerate(texts):
            for a, b in zip(t, t[1:]):
                x[i, zlib.crc32((a + b).encode()) % self.dim] += 1.0
        return torch.nn.functional.normalize(torch.from_numpy(x), dim=1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------- torchmetrics parity

def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE alphabet: printable bytes map to themselves, the rest to 256+.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def _tiny_clip_dir(root: Path) -> Path:
    """A random tiny CLIPModel + CLIPProcessor saved with save_pretrained (no download)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = root / "openai-tiny-clip"
    d.mkdir()
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    n = len(vocab)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).eval().save_pretrained(d)
    proc.save_pretrained(d)
    return d


class _PooledFeatures(torch.nn.Module):
    """transformers 5 returns a ModelOutput from get_*_features where torchmetrics 1.9 expects the tensor;
    this hands torchmetrics the projected features (`pooler_output`), nothing else changes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *a, **k):
        return self.model.get_image_features(*a, **k).pooler_output

    def get_text_features(self, *a, **k):
        return self.model.get_text_features(*a, **k).pooler_output


class HFClipAdapter:
    """Our side: the same saved model through CLIPProcessor, as a DualEncoder."""

    def __init__(self, path: Path):
        from transformers import CLIPModel, CLIPProcessor

        self.model, self.proc = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)

    @torch.no_grad()
    def encode_image(self, images):
        px = self.proc(images=images, return_tensors="pt")["pixel_values"]
        return torch.nn.functional.normalize(self.model.get_image_features(pixel_values=px).pooler_output, dim=1)

    @torch.no_grad()
    def encode_text(self, texts):
        t = self.proc(text=texts, return_tensors="pt", padding=True)
        out = self.model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        return torch.nn.functional.normalize(out.pooler_output, dim=1)


def test_clipscore_matches_torchmetrics_on_real_coco(tmp_path):
    from transformers import CLIPModel, CLIPProcessor
    from torchmetrics.multimodal.clip_score import CLIPScore

    d = _tiny_clip_dir(tmp_path)
    images, captions = coco_samples(5)
    metric = CLIPScore(model_name_or_path=lambda: (_PooledFeatures(CLIPModel.from_pretrained(d)),
                                                   CLIPProcessor.from_pretrained(d)))
    metric.update([torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous() for im in images], captions)
    expected = float(metric.compute())

    enc = HFClipAdapter(d)
    ours = clip_score(images, captions, enc, scale=100, clamp="mean")
    assert ours.n == 5 and ours.extra["convention"] == "torchmetrics"
    assert abs(ours.value - expected) <= 1e-4
    assert ours.ci[0] <= ours.value <= ours.ci[1]

    # Hessel's convention from the same embeddings, by hand: 2.5 * max(cos, 0) per pair, then the mean.
    cos = (enc.encode_image(images) * enc.encode_text(captions)).sum(1).double().numpy()
    hessel = clip_score(images, captions, enc)
    assert hessel.value == pytest.approx(float(np.mean(2.5 * np.maximum(cos, 0))), abs=1e-6)
    assert hessel.per_sample == pytest.approx(2.5 * np.maximum(cos, 0), abs=1e-6)


def test_clipscore_conventions_differ_when_a_cosine_is_negative():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]])  # cos 1, 0, about -0.98
    cos = np.array([1.0, 0.0, -1.0 / np.sqrt(1.04)])
    h = clip_score(img, txt)
    assert h.value == pytest.approx(2.5 * np.mean(np.maximum(cos, 0)))
    assert h.extra["n_negative"] == 1
    t = clip_score(img, txt, scale=100, clamp="mean")
    assert t.value == pytest.approx(100 * cos.mean())  # the mean is clamped, not each pair
    assert t.value < 100 / 2.5 * h.value
    neg = clip_score(img, -img, scale=100, clamp="mean")
    assert neg.value == 0.0 and neg.ci == (0.0, 0.0)
    with pytest.raises(ValueError, match="clamp"):
        clip_score(img, txt, clamp="pair")


# ---------------------------------------------------------------- CLIP-I / CLIP-T

def test_clip_i_and_clip_t_against_numpy():
    rng = np.random.default_rng(1)
    a, b, t = (rng.normal(size=(7, 12)) for _ in range(3))
    r = clip_i(torch.from_numpy(a), torch.from_numpy(b))
    assert r.name == "CLIP-I" and r.n == 7
    assert r.per_sample == pytest.approx((_unit(a) * _unit(b)).sum(1), abs=1e-12)
    assert r.value == pytest.approx(float((_unit(a) * _unit(b)).sum(1).mean()), abs=1e-12)
    r = clip_t(torch.from_numpy(a), torch.from_numpy(t))
    assert r.name == "CLIP-T" and r.value == pytest.approx(float((_unit(a) * _unit(t)).sum(1).mean()), abs=1e-12)


def test_encoder_path_equals_embedding_path_on_real_images():
    enc = TinyEncoder()
    images, captions = coco_samples(6)
    flipped = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
    via_enc = clip_i(flipped, images, enc)
    via_emb = clip_i(enc.encode_image(flipped), enc.encode_image(images))
    assert via_enc.value == pytest.approx(via_emb.value, abs=1e-12)
    assert clip_i(images, images, enc).value == pytest.approx(1.0, abs=1e-12)
    assert clip_t(images, captions, enc).value == pytest.approx(
        float((enc.encode_image(images) * enc.encode_text(captions)).sum(1).mean()), abs=1e-12)


@pytest.mark.parametrize("bad, match", [
    (lambda: clip_i(torch.ones(3, 4), torch.ones(2, 4)), "differ in number"),
    (lambda: clip_i(torch.ones(3, 4), torch.ones(3, 5)), "dimension"),
    (lambda: clip_i(torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2)), "NaN"),
    (lambda: clip_i(torch.zeros(1, 2), torch.ones(1, 2)), "all zeros"),
    (lambda: clip_i(torch.ones(4), torch.ones(4)), r"\[N, D\]"),
    (lambda: clip_i([Image.new("RGB", (4, 4))], torch.ones(1, 2)), "no encoder"),
    (lambda: clip_t(torch.ones(1, 2), "one caption", TinyEncoder()), "one string"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


# ---------------------------------------------------------------- rank accuracy

def test_rank_pools_are_deterministic_and_valid():
    p = rank_pools(30, 10, seed=3)
    assert p.shape == (30, 10) and (p[:, 0] == np.arange(30)).all()
    for i, row in enumerate(p):
        assert len(set(row)) == 10 and i not in row[1:] and row.min() >= 0 and row.max() < 30
    assert (p == rank_pools(30, 10, seed=3)).all() and not (p == rank_pools(30, 10, seed=4)).all()
    with pytest.raises(ValueError, match="at least 10 samples"):
        rank_pools(9, 10)


def test_rank_accuracy_against_brute_force():
    rng = np.random.default_rng(0)
    txt = rng.normal(size=(40, 8))
    img = txt + rng.normal(scale=1.2, size=txt.shape)  # related but noisy: ranks spread out
    res = t2i_rank_accuracy(torch.from_numpy(txt), torch.from_numpy(img), pool_size=10, ks=(1, 3), seed=5)
    pools = rank_pools(40, 10, seed=5)
    t, m = _unit(txt), _unit(img)
    ranks = np.array([1 + int(((m[pools[i, 1:]] @ t[i]) >= m[i] @ t[i]).sum()) for i in range(40)])
    assert 0 < (ranks == 1).mean() < 1  # a test that can fail
    assert res["t2i_R@1"].value == pytest.approx(100 * (ranks <= 1).mean())
    assert res["t2i_R@3"].value == pytest.approx(100 * (ranks <= 3).mean())
    assert res["t2i_rank"].value == pytest.approx(ranks.mean())
    assert res["t2i_R@1"].extra["pool_size"] == 10


def test_rank_accuracy_extremes():
    e = torch.from_numpy(np.random.default_rng(2).normal(size=(20, 6)))
    assert t2i_rank_accuracy(e, e, pool_size=20)["t2i_R@1"].value == 100.0
    const = torch.ones(20, 6)  # every image alike: ties count against, so a degenerate encoder scores 0
    r = t2i_rank_accuracy(e, const, pool_size=20, ks=(1,))
    assert r["t2i_R@1"].value == 0.0 and r["t2i_rank"].value == 20.0
    with pytest.raises(ValueError, match="every k"):
        t2i_rank_accuracy(e, e, pool_size=5, ks=(1, 10))
