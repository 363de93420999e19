"""Checkpoints: Chameleon (HF layout) import parity with transformers, native round trip, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models

from cm3leon import checkpoint, vq as vq_lib
from cm3leon.config import ModelConfig
from cm3leon.text import TextTokenizer
from cm3leon.transformer import Transformer

transformers = pytest.importorskip("transformers")

from chameleon_fixture import N_CODES, N_TEXT, hf_folder, hf_model as _hf_model  # noqa: E402,F401

def _mixed_batch(cfg: ModelConfig):
    """Left-padded sequences of text, <racm3:break> image codes <eoss>, text."""
    g = torch.Generator().manual_seed(3)
    img_ids = torch.tensor(cfg.image_token_ids)
    text_lo = cfg.vocab_size - N_TEXT
    seqs = []
    for n_text, n_img in ((5, 12), (2, 6), (9, 3)):
        s = [cfg.bos_id] + torch.randint(text_lo, cfg.vocab_size, (n_text,), generator=g).tolist()
        s += [cfg.boi_id] + img_ids[torch.randint(0, N_CODES, (n_img,), generator=g)].tolist() + [cfg.eoi_id]
        s += torch.randint(text_lo, cfg.vocab_size, (3,), generator=g).tolist()
        seqs.append(s)
    T = max(map(len, seqs))
    tokens = torch.full((len(seqs), T), cfg.pad_id)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, T - len(s):] = torch.tensor(s)
        valid[i, T - len(s):] = True
    return tokens, valid


def test_chameleon_import_matches_transformers_logits(hf_folder):
    bundle = checkpoint.load(hf_folder)
    hf = _hf_model(hf_folder)
    tokens, valid = _mixed_batch(bundle.config)
    position_ids = (valid.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        hidden = hf.model(input_ids=tokens, attention_mask=valid.long(), position_ids=position_ids).last_hidden_state
        ref = hf.lm_head(hidden)  # unmasked: HF's forward hides image-token logits, we compare all columns
        ours = bundle.model(tokens, valid)
    diff = (ours - ref)[valid].abs().max().item()
    assert diff <= 1e-4, diff
    # and HF's own forward on the text columns it does not mask
    with torch.no_grad():
        hf_logits = hf(input_ids=tokens, attention_mask=valid.long(), position_ids=position_ids).logits
    text_cols = ~bundle.config.is_image_token_mask()
    assert (ours[..., text_cols] - hf_logits[..., text_cols])[valid].abs().max().item() <= 1e-4


def test_chameleon_image_vocabulary_mapping_matches_transformers(hf_folder):
    bundle = checkpoint.load(hf_folder)
    hf = _hf_model(hf_folder)
    codes = torch.arange(N_CODES)
    expected = hf.model.vocabulary_mapping.convert_img2bpe(codes)
    assert bundle.config.image_token_id_tensor().tolist() == expected.tolist()
    assert bundle.tokenizer.image_token_ids() == expected.tolist()


def test_chameleon_vq_codes_equal_transformers(hf_folder):
    bundle = checkpoint.load(hf_folder)
    hf = _hf_model(hf_folder)
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        ref = hf.model.vqmodel.encode(pixels, return_dict=True).image_tokens.view(3, -1)
        ours = bundle.vq.encode(pixels)
    assert torch.equal(ours, ref)
    assert bundle.config.image_seq_len == ours.shape[1]


# ----------------------------------------------------------------------------- native format
@pytest.fixture(scope="module")
def native_bundle() -> checkpoint.ModelBundle:
    tok = TextTokenizer.train(["a red circle on the left", "two blue squares", "what color is it"] * 20,
                              n_text=300, image_codebook_size=16)
    fields = tok.model_config_fields()
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=128, qk_norm=True, image_seq_len=16, **fields)
    torch.manual_seed(0)
    vq = vq_lib.VQModel(vq_lib.VQConfig(resolution=16, base_channels=32, channel_multiplier=[1, 1, 2],
                                        num_res_blocks=1, attn_resolutions=[], latent_channels=4, embed_dim=4,
                                        num_embeddings=16)).eval()
    return checkpoint.ModelBundle(cfg, Transformer(cfg).eval(), tok, vq, 16)


def test_native_round_trip_bitwise(native_bundle, tmp_path):
    folder = checkpoint.save(native_bundle, tmp_path / "m")
    loaded = checkpoint.load(folder)
    tokens = torch.randint(0, native_bundle.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(native_bundle.model(tokens), loaded.model(tokens))
        px = torch.rand(1, 3, 16, 16) * 2 - 1
        assert torch.equal(native_bundle.vq.encode(px), loaded.vq.encode(px))
    assert loaded.config == native_bundle.config
    assert loaded.fingerprint and loaded.fingerprint == checkpoint.load(folder).fingerprint


def test_truncated_safetensors_names_the_file(native_bundle, tmp_path):
    folder = checkpoint.save(native_bundle, tmp_path / "m")
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt"):
        checkpoint.load(folder)


def test_shape_mismatch_names_the_tensor(native_bundle, tmp_path):
    folder = checkpoint.save(native_bundle, tmp_path / "m")
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["d_ff"] = 64  # weights were saved with another d_ff
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor layers\.0\.feed_forward\.w1\.weight has shape"):
        checkpoint.load(folder)


def test_missing_tokenizer_names_the_file(native_bundle, tmp_path):
    folder = checkpoint.save(native_bundle, tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json: tokenizer missing"):
        checkpoint.load(folder)


def test_pickle_that_is_not_plain_weights_is_refused(tmp_path):
    class NotWeights:  # any object beyond tensors and containers: weights_only must refuse it
        def __reduce__(self):
            return (print, ("this would run on load",))

    ckpt = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "evil": NotWeights()}, ckpt)
    cfg = vq_lib.VQConfig(resolution=16, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                          latent_channels=4, embed_dim=4, num_embeddings=16)
    with pytest.raises(ValueError, match=r"vqgan\.ckpt: refused to load: not a plain-weights checkpoint"):
        vq_lib.load_taming_checkpoint(ckpt, cfg)


def test_unknown_folder_and_demo_alias_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        checkpoint.load(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        checkpoint.load(tmp_path / "x")
