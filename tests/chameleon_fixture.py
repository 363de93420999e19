"""A tiny random Chameleon saved in the HF layout (transformers is the reference implementation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models

from cm3leon.text import chameleon_image_token

N_CODES = 40
N_TEXT = 30


def chameleon_vocab() -> dict[str, int]:
    """A miniature of Chameleon's vocabulary: specials, IMGIMG tokens in name order, then text."""
    names = ["<s>", "<pad>", "</s>", "<reserved08706>"]
    names += sorted(chameleon_image_token(c) for c in range(N_CODES))  # ids follow name order, as in the release
    names += ["<eoss>", "<racm3:break>"]
    names += [f"w{i}" for i in range(N_TEXT)]
    return {n: i for i, n in enumerate(names)}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vocab = chameleon_vocab()
    vq_config = dict(embed_dim=8, num_embeddings=N_CODES, latent_channels=8, resolution=32, in_channels=3,
                     base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[8])
    cfg = ChameleonConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          rms_norm_eps=1e-6, vocabulary_map=vocab, vq_config=vq_config, bos_token_id=0,
                          eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make norms and qk-norm non-trivial so their layout is tested
        for name, p in model.named_parameters():
            if "norm" in name and "vqmodel" not in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p)) if name.endswith("weight") else p.copy_(0.2 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("chameleon-hf")
    model.save_pretrained(out, safe_serialization=True)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.save(str(out / "tokenizer.json"))
    return out


def hf_model(folder: Path):
    from transformers import ChameleonForConditionalGeneration

    return ChameleonForConditionalGeneration.from_pretrained(folder).eval()


