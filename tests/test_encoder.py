"""Dual encoders: native round trip, normalisation, the document rule, open_clip / HF CLIP from local files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cm3leon.encoder import (NativeDualEncoder, NativeEncoderConfig, _load_torch_state, contrastive_loss,
                             encode_documents, load_encoder)

SMALL = NativeEncoderConfig(image_channels=(8, 16, 16, 16), text_dim=32, text_heads=2, dim=16)


def _shape(color, size=(64, 64), box=(16, 16, 48, 48)) -> Image.Image:
    im = Image.new("RGB", size, (255, 255, 255))
    im.paste(Image.new("RGB", (box[2] - box[0], box[3] - box[1]), color), box[:2])
    return im


IMAGES = [_shape((255, 0, 0)), _shape((0, 0, 255), size=(96, 64)), _shape((0, 160, 0), box=(0, 0, 20, 20)),
          Image.new("RGBA", (40, 40), (255, 255, 0, 100))]
TEXTS = ["a red square", "a blue square on a wide canvas", "small green square top left", "faint yellow"]


@pytest.fixture(scope="module")
def native() -> NativeDualEncoder:
    torch.manual_seed(0)
    return NativeDualEncoder(SMALL)


def test_native_vectors_normalised_and_padding_free(native):
    t, i = native.encode_text(TEXTS), native.encode_image(IMAGES)
    assert t.shape == (4, 16) and i.shape == (4, 16) and t.dtype == torch.float32
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(i.norm(dim=-1), torch.ones(4))
    # a text's vector does not depend on the longer texts padded beside it
    torch.testing.assert_close(native.encode_text([TEXTS[0]])[0], t[0], atol=1e-5, rtol=0)
    assert not torch.allclose(t[0], t[1])


def test_native_save_load_round_trip(native, tmp_path):
    path = native.save(tmp_path / "enc")
    assert path.name == "encoder.safetensors"
    back = load_encoder(f"native:{path}")
    assert back.cfg == native.cfg
    assert torch.equal(back.encode_text(TEXTS), native.encode_text(TEXTS))
    assert torch.equal(back.encode_image(IMAGES), native.encode_image(IMAGES))
    assert back.fingerprint() == native.fingerprint()
    with torch.no_grad():
        back.text_proj.weight[0, 0] += 1e-3
    assert back.fingerprint() != native.fingerprint()  # the weights are part of the fingerprint


def test_native_load_rejects_bad_files(native, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in native.state_dict().items()}
    cfg = json.dumps(SMALL.__dict__ | {"image_channels": list(SMALL.image_channels)})
    bad = tmp_path / "wrong_format.safetensors"
    save_file(state, str(bad), metadata={"format": "something-else", "config": cfg})
    with pytest.raises(ValueError, match="wrong_format.safetensors.*format"):
        NativeDualEncoder.load(bad)
    missing = tmp_path / "missing_tensor.safetensors"
    save_file({k: v for k, v in state.items() if k != "text_proj.weight"}, str(missing),
              metadata={"format": "cm3eval-dual-encoder/1", "config": cfg})
    with pytest.raises(ValueError, match="missing_tensor.safetensors.*text_proj.weight"):
        NativeDualEncoder.load(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        NativeDualEncoder.load(garbage)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        NativeDualEncoder.load(tmp_path / "nope.safetensors")


def test_contrastive_loss_is_symmetric_infonce():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * img @ txt.t()
    expect = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5)))
    torch.testing.assert_close(contrastive_loss(img, txt, scale), expect)
    assert contrastive_loss(img, img, math.log(100.0)) < 1e-3  # perfectly matched pairs


def test_native_training_steps_reduce_loss():
    torch.manual_seed(0)
    enc = NativeDualEncoder(SMALL)
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss = enc.loss(IMAGES, TEXTS)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert enc.loss(IMAGES, TEXTS).item() < 0.5 * first


class _Table:
    """Encoder whose vectors are given: text -> vector, image (by its top-left pixel) -> vector."""
    name, dim = "table", 3

    def __init__(self, text: dict, image: dict) -> None:
        self.text, self.image = text, image

    def encode_text(self, texts):
        return F.normalize(torch.tensor([self.text[t] for t in texts], dtype=torch.float32), dim=-1)

    def encode_image(self, images):
        return F.normalize(torch.tensor([self.image[im.getpixel((0, 0))] for im in images], dtype=torch.float32), dim=-1)

    def fingerprint(self):
        return "table"


def test_encode_documents_averages_normalised_parts():
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    enc = _Table({"t": [3.0, 0, 0]}, {(255, 0, 0): [0, 0.5, 0]})  # unnormalised on purpose
    v = encode_documents(enc, ["t", "t", None], [red, None, red])
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(v, torch.tensor([[s, s, 0], [1, 0, 0], [0, 1, 0]]))
    with pytest.raises(ValueError, match="neither text nor image"):
        encode_documents(enc, [None], [None])


def test_load_encoder_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="expected native:PATH"):
        load_encoder("clip")
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_encoder(f"native:{tmp_path / 'absent.safetensors'}")


def test_torch_files_load_only_as_weights(tmp_path):
    ok = tmp_path / "w.pt"
    torch.save({"state_dict": {"module.a": torch.ones(2)}}, ok)
    assert list(_load_torch_state(ok)) == ["a"]
    evil = tmp_path / "evil.pt"
    torch.save({"a": torch.ones(2), "obj": _Table({}, {})}, evil)  # needs unpickling arbitrary classes
    with pytest.raises(ValueError, match="evil.pt.*weights_only"):
        _load_torch_state(evil)


# ----------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    path = tmp_path_factory.mktemp("oc") / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_open_clip_encoder_from_local_file(open_clip_file):
    model, path = open_clip_file
    enc = load_encoder(f"open_clip:ViT-B-32:{path}")
    assert enc.dim == 512 and enc.fingerprint().startswith("open_clip:ViT-B-32:")
    t, i = enc.encode_text(TEXTS), enc.encode_image(IMAGES[:2])
    assert t.shape == (4, 512) and i.shape == (2, 512)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(i.norm(dim=-1), torch.ones(2))
    # the weights really came from the file: same vectors as the model that was saved
    import open_clip

    with torch.no_grad():
        ref = model.encode_text(open_clip.get_tokenizer("ViT-B-32")(TEXTS), normalize=True)
    torch.testing.assert_close(t, ref, atol=1e-5, rtol=0)


def test_open_clip_missing_file_says_how_to_get_it(tmp_path):
    pytest.importorskip("open_clip")
    with pytest.raises(FileNotFoundError, match=r"(?s)nothere.bin.*laion2b_s34b_b79k"):
        load_encoder(f"open_clip:ViT-B-32:{tmp_path / 'nothere.bin'}")


# ----------------------------------------------------------------------------- transformers CLIP


def _tiny_hf_clip(folder):
    transformers = pytest.importorskip("transformers")
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    # a byte-level BPE vocabulary with no merges: every byte is a token (GPT-2's byte -> char map)
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = [b for b in range(256) if b not in keep]
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder.mkdir()
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=40,
                                      bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=24)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, transformers


def test_hf_clip_encoder_from_local_folder(tmp_path):
    model, tok, _ = _tiny_hf_clip(tmp_path / "clip")
    enc = load_encoder(f"hf-clip:{tmp_path / 'clip'}")
    assert enc.dim == 24
    t, i = enc.encode_text(TEXTS), enc.encode_image(IMAGES)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(i.norm(dim=-1), torch.ones(4))
    with torch.no_grad():
        batch = tok(TEXTS, padding=True, return_tensors="pt")
        out = model.get_text_features(**batch)
        ref = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
    torch.testing.assert_close(t, ref, atol=1e-5, rtol=0)


def test_hf_clip_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nofolder"):
        load_encoder(f"hf-clip:{tmp_path / 'nofolder'}")
