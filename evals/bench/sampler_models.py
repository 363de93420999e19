"""The models `cm3eval bench sampler` measures: imported Chameleon sizes and named random shapes.

`--size` builds a random Chameleon in transformers (no download), saves it in the HF layout and
imports it through cm3leon.checkpoint, so both engines run the very same weights. `--config`
builds a native model of a named shape with random weights on the target device (the 7B shape
needs a GPU: 14 GB in bf16), for the sampler-only numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

SIZES = {  # name: (hidden, layers, heads, kv heads, intermediate, image codes, vq resolution)
    "tiny": (128, 2, 4, 4, 352, 512, 32),
    "small": (512, 8, 8, 8, 1408, 8192, 64),
    "medium": (1024, 16, 16, 16, 2816, 8192, 64),
}

_DEMO_CONFIG = Path(__file__).resolve().parents[2] / "cm3leon" / "zoo" / "shapes-demo" / "config.json"


def _chameleon_shape(d: int, layers: int, heads: int, kv: int, ff: int) -> dict:
    # Chameleon's token space: 65,536 ids, image codes at 4..8195, 1,024 codes per image
    return dict(vocab_size=65536, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, d_ff=ff,
                max_seq_len=4096, norm="rmsnorm", qk_norm=True, pos_encoding="rope", mlp="swiglu",
                image_codebook_size=8192, image_seq_len=1024, image_token_offset=4, bos_id=0, pad_id=1,
                eos_id=2, boi_id=8197, eoi_id=8196, break_id=8198, mask_id=8199, source="bench")


NAMED_CONFIGS = {
    "demo": None,  # the shipped demo model's shape (cm3leon/zoo/shapes-demo/config.json)
    "chameleon-1b-shape": _chameleon_shape(2048, 22, 16, 16, 5632),
    "chameleon-7b-shape": _chameleon_shape(4096, 32, 32, 32, 11008),
}


def named_config(name: str):
    from cm3leon.config import ModelConfig

    if name not in NAMED_CONFIGS:
        raise KeyError(name)
    if name == "demo":
        if not _DEMO_CONFIG.is_file():
            raise FileNotFoundError(f"demo config not found at {_DEMO_CONFIG} (it ships with the repository)")
        return ModelConfig.from_dict(json.loads(_DEMO_CONFIG.read_text())["model"], source=str(_DEMO_CONFIG))
    return ModelConfig(**NAMED_CONFIGS[name])


def random_model(name: str, device, dtype):
    """A named shape with GPT-2-style random weights, built directly on `device`; a sharper head so
    samples are not uniform noise (the speed does not depend on the values)."""
    import torch

    from cm3leon.transformer import Transformer

    cfg = named_config(name)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    model = model.to(dtype).eval()
    with torch.no_grad():
        model.output.weight.mul_(10)
    return cfg, model


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # keeps --json output a single line


def build_chameleon(folder: Path, size: str) -> None:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from cm3leon.text import chameleon_image_token

    quiet_transformers()
    d, layers, heads, kv, inter, n_codes, res = SIZES[size]
    names = ["<s>", "<pad>", "</s>", "<reserved08706>"] + sorted(chameleon_image_token(c) for c in range(n_codes))
    names += ["<eoss>", "<racm3:break>"] + [f"w{i}" for i in range(1000)]
    vocab = {n: i for i, n in enumerate(names)}
    vq = dict(embed_dim=8, num_embeddings=n_codes, latent_channels=8, resolution=res, base_channels=32,
              channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[])
    cfg = ChameleonConfig(vocab_size=len(vocab), hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                          vocabulary_map=vocab, vq_config=vq, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # peaked distributions: greedy paths are not decided by float noise
    model.save_pretrained(folder, safe_serialization=True)
    Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>")).save(str(folder / "tokenizer.json"))


def load_imported(size: str, device, dtype):
    """(cfg, our model, transformers' model) of one random Chameleon at `size`."""
    import tempfile

    from transformers import ChameleonForConditionalGeneration

    from cm3leon import checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_chameleon(folder, size)
        bundle = checkpoint.load(folder, device=device, dtype=dtype)
        hf = ChameleonForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
    return bundle.config, bundle.model, hf
