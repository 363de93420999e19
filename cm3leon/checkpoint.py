"""Checkpoints: the native folder format, and import of Chameleon / Anole checkpoints in the HF layout.

Native folder:
    config.json          {"format": "cm3eval-native", "model": ModelConfig, "image_resolution": int, ...}
    model.safetensors    decoder weights (names as in transformer.py = Meta's original names)
    vq.safetensors       VQ-GAN (cm3leon.vq.save_native)
    tokenizer.json       `tokenizers` BPE with image-code and special tokens (cm3leon.text)
    encoder.safetensors  optional dual encoder for retrieval / CLIP-style scores (cm3leon.encoder)
    bank/                optional retrieval memory bank (cm3leon.retrieval)

HF layout (transformers' ChameleonForConditionalGeneration.save_pretrained, Anole's converted weights):
    config.json (model_type "chameleon", vocabulary_map, vq_config), model.safetensors or shards with
    model.safetensors.index.json, tokenizer.json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import vq as vq_lib
from .config import ModelConfig
from .text import TextTokenizer, chameleon_code
from .transformer import Transformer
from .weights import load_strict, read_safetensors, read_sharded_safetensors

NATIVE_FORMAT = "cm3eval-native"
ZOO = Path(__file__).parent / "zoo"
ALIASES = {"demo": ZOO / "shapes-demo"}


@dataclass
class ModelBundle:
    """Everything a task needs from one checkpoint."""

    config: ModelConfig
    model: Transformer
    tokenizer: TextTokenizer
    vq: vq_lib.VQModel | None
    image_resolution: int
    path: Path | None = None
    fingerprint: str = ""
    encoder: Any = None  # cm3leon.encoder.DualEncoder when the checkpoint ships one
    bank_dir: Path | None = None

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device


# ----------------------------------------------------------------------------- resolving and fingerprints
def resolve(path_or_alias: str | Path) -> Path:
    if str(path_or_alias) in ALIASES:
        path = ALIASES[str(path_or_alias)]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"the demo model is not in {path}; rebuild it with `cm3eval train demo` (it ships with the package)")
        return path
    path = Path(path_or_alias).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path} (expected config.json, weights and tokenizer.json)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'}: missing; a model folder needs config.json")
    return path


def fingerprint_folder(path: Path) -> str:
    """Identity of a checkpoint without reading gigabytes: config bytes, file names, sizes, head and tail."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(str(f.stat().st_size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if f.stat().st_size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _tokenizer(path: Path) -> TextTokenizer:
    file = path / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: tokenizer missing; a model folder needs its tokenizer.json")
    return TextTokenizer.from_file(file)


# ----------------------------------------------------------------------------- native format
def save(bundle: ModelBundle, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": NATIVE_FORMAT, "format_version": 1, "model": bundle.config.to_dict(),
            "image_resolution": bundle.image_resolution}
    (path / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}
    if bundle.config.tie_embeddings:
        state.pop("output.weight")  # safetensors refuses shared storage; re-tied on load
    save_file(state, str(path / "model.safetensors"), metadata={"format": NATIVE_FORMAT})
    if bundle.vq is not None:
        vq_lib.save_native(bundle.vq, path / vq_lib.VQ_FILENAME)
    bundle.tokenizer.save(path / "tokenizer.json")
    if bundle.encoder is not None and hasattr(bundle.encoder, "save"):
        bundle.encoder.save(path / "encoder.safetensors")
    return path


def load(path_or_alias: str | Path = "demo", *, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, with_encoder: bool = True) -> ModelBundle:
    """Load a native folder or an HF-layout Chameleon/Anole folder (detected from config.json)."""
    path = resolve(path_or_alias)
    meta = _read_json(path / "config.json")
    if meta.get("model_type") == "chameleon":
        bundle = load_chameleon_hf(path, device=device, dtype=dtype)
    elif meta.get("format") == NATIVE_FORMAT:
        bundle = _load_native(path, meta, device=device, dtype=dtype, with_encoder=with_encoder)
    else:
        raise ValueError(f"{path / 'config.json'}: unknown checkpoint format (neither 'format': '{NATIVE_FORMAT}' "
                         "nor an HF config with 'model_type': 'chameleon')")
    bundle.fingerprint = fingerprint_folder(path)
    return bundle


def _load_native(path: Path, meta: dict[str, Any], *, device, dtype, with_encoder: bool) -> ModelBundle:
    cfg_file = path / "config.json"
    if "model" not in meta:
        raise ValueError(f"{cfg_file}: missing field 'model'")
    try:
        cfg = ModelConfig.from_dict(meta["model"], source=f"{cfg_file}: model")
    except TypeError as e:
        raise ValueError(f"{cfg_file}: model: {e}") from None
    tokenizer = _tokenizer(path)
    _check_tokenizer(tokenizer, cfg, path / "tokenizer.json")
    model = Transformer(cfg)
    weights_file = path / "model.safetensors"
    state, _ = read_safetensors(weights_file)
    if cfg.tie_embeddings and "output.weight" not in state and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    load_strict(model, state, str(weights_file), "the decoder described by config.json")
    model = model.to(device=device, dtype=dtype).eval()
    vq_file = path / vq_lib.VQ_FILENAME
    vq = vq_lib.load_native(vq_file, device=device).eval() if vq_file.is_file() else None
    encoder = None
    if with_encoder and (path / "encoder.safetensors").is_file():
        from .encoder import NativeDualEncoder  # optional part of a bundle

        encoder = NativeDualEncoder.load(path / "encoder.safetensors").to(device).eval()
    bank_dir = path / "bank" if (path / "bank" / "bank.json").is_file() else None
    return ModelBundle(cfg, model, tokenizer, vq, int(meta.get("image_resolution", 64)), path,
                       encoder=encoder, bank_dir=bank_dir)


def _check_tokenizer(tok: TextTokenizer, cfg: ModelConfig, source: Path) -> None:
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{source}: tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size}")
    ids = tok.image_token_ids()
    if ids and ids != cfg.image_token_id_tensor().tolist():
        raise ValueError(f"{source}: the tokenizer's image-code tokens do not match config.json's image token ids")


# ----------------------------------------------------------------------------- Chameleon / Anole (HF layout)
def chameleon_image_token_ids(vocabulary_map: dict[str, int]) -> list[int]:
    """VQ code -> token id from the `IMGIMG<letters>Z` names (letters A-J are the code's digits)."""
    pairs = sorted((chameleon_code(name), int(token_id)) for name, token_id in vocabulary_map.items()
                   if chameleon_code(name) is not None)
    if [c for c, _ in pairs] != list(range(len(pairs))):
        raise ValueError("vocabulary_map: IMGIMG names do not cover codes 0..N-1 exactly once")
    return [t for _, t in pairs]


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    vocab = hf.get("vocabulary_map")
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"{source}: missing 'vocabulary_map' (needed for the image-token ids)")
    image_ids = chameleon_image_token_ids(vocab)
    d, n_heads = int(hf.get("hidden_size", 4096)), int(hf.get("num_attention_heads", 32))
    rope = hf.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    vq_cfg = hf.get("vq_config") or {}
    resolution = int(vq_cfg.get("resolution", 512))
    factor = 2 ** (len(vq_cfg.get("channel_multiplier", [1, 1, 2, 2, 4])) - 1)

    def special(name: str, fallback: int | None = None) -> int | None:
        return int(vocab[name]) if name in vocab else fallback

    pad = hf.get("pad_token_id")
    boi = special("<racm3:break>")
    if boi is None or special("<eoss>") is None:
        raise ValueError(f"{source}: vocabulary_map lacks <racm3:break> / <eoss> (Chameleon's image delimiters)")
    return ModelConfig(
        vocab_size=int(hf.get("vocab_size", 65536)), d_model=d, n_layers=int(hf.get("num_hidden_layers", 32)),
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        d_ff=int(hf.get("intermediate_size", 11008)), max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-5)), qk_norm=True, qk_norm_eps=1e-5,
        swin_norm=bool(hf.get("swin_norm", False)), pos_encoding="rope", rope_theta=theta, mlp="swiglu",
        bias=bool(hf.get("attention_bias", False)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        image_codebook_size=len(image_ids), image_seq_len=(resolution // factor) ** 2, image_token_ids=image_ids,
        bos_id=hf.get("bos_token_id", 1), eos_id=int(hf.get("eos_token_id", 2)),
        pad_id=int(pad if pad is not None else special("<pad>", 1)),
        boi_id=boi, eoi_id=special("<eoss>"), break_id=boi, mask_id=special("<reserved08706>"),
        source="chameleon-hf",
    )


def _unpermute_rows(w: torch.Tensor, n_heads: int, matrix: bool) -> torch.Tensor:
    """Undo the HF conversion's q/k permutation (rotate-half order -> Meta's interleaved pairs).

    HF stored permute(w) = w.view(n, hd/2, 2, ...).transpose(1, 2); the inverse views the head's
    rows as (2, hd/2) and swaps them back. `matrix`: a projection weight [n*hd, d]; otherwise a
    bias [n*hd] or a per-head qk-norm parameter [n, hd].
    """
    trailing = tuple(w.shape[1:]) if matrix else ()
    return w.reshape(n_heads, 2, -1, *trailing).transpose(1, 2).reshape(w.shape)


def chameleon_state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' Chameleon decoder keys -> ours (VQ keys are handled by cm3leon.vq)."""
    top = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}
    sub = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
           "self_attn.o_proj": "attention.wo", "self_attn.q_norm": "attention.q_normalization",
           "self_attn.k_norm": "attention.k_normalization", "mlp.gate_proj": "feed_forward.w1",
           "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
           "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_sd.items():
        if key.startswith("model.vqmodel.") or key.endswith("rotary_emb.inv_freq"):
            continue
        if key in top:
            out[top[key]] = value
            continue
        parts = key.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"]:
            out[key] = value  # unknown: kept so strict loading names it
            continue
        layer, module, leaf = parts[2], ".".join(parts[3:-1]), parts[-1]
        if module not in sub:
            out[key] = value
            continue
        matrix = module.endswith("_proj") and leaf == "weight"
        if module in ("self_attn.q_proj", "self_attn.q_norm"):
            value = _unpermute_rows(value, cfg.n_heads, matrix)
        elif module in ("self_attn.k_proj", "self_attn.k_norm"):
            value = _unpermute_rows(value, cfg.n_kv_heads, matrix)
        out[f"layers.{layer}.{sub[module]}.{leaf}"] = value
    if cfg.tie_embeddings and "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def load_chameleon_hf(path: str | Path, *, device="cpu", dtype=torch.float32) -> ModelBundle:
    path = Path(path)
    hf = _read_json(path / "config.json")
    cfg = model_config_from_hf(hf, str(path / "config.json"))
    tokenizer = _tokenizer(path)
    if tokenizer.image_token_ids() and tokenizer.image_token_ids() != cfg.image_token_ids:
        raise ValueError(f"{path / 'tokenizer.json'}: IMGIMG tokens disagree with config.json's vocabulary_map")
    hf_sd = read_sharded_safetensors(path, "model.safetensors", "model.safetensors.index.json")
    model = Transformer(cfg)
    load_strict(model, chameleon_state_dict_from_hf(hf_sd, cfg), str(path), "the Chameleon decoder in config.json")
    model = model.to(device=device, dtype=dtype).eval()
    vq = None
    if any(k.startswith("model.vqmodel.") for k in hf_sd):
        vq_cfg = vq_lib.VQConfig.from_hf_dict(hf.get("vq_config") or {}, source=f"{path / 'config.json'}: vq_config")
        vq = vq_lib.load_hf_vq(hf_sd, vq_cfg, str(path)).to(device).eval()
    resolution = int((hf.get("vq_config") or {}).get("resolution", 512))
    return ModelBundle(cfg, model, tokenizer, vq, resolution, path)
