"""HF and Meta checkpoint layouts -> our decoder: configs, tensor names, weight streams.

Chameleon / Anole / Lumina-mGPT (model_type "chameleon"), Liquid (GemmaForCausalLM) and Emu3
(Emu3ForConditionalGeneration) in transformers' layout, and Meta's Chameleon release (the native
folder is in checkpoint.py):

HF (transformers' ChameleonForConditionalGeneration.save_pretrained, Anole's converted weights):
    config.json (model_type "chameleon", vocabulary_map, vq_config), model.safetensors or shards
    + model.safetensors.index.json, tokenizer.json. `model.vqmodel.*` holds the VQ encoder (the
    conversion drops the decoder); q/k projections and qk-norms are permuted to rotate-half order.
Meta's original release:
    ROOT/models/<size>/params.json (+ consolidate_params.json), consolidated.pth or
    consolidated.NN.pth (model-parallel shards), ROOT/tokenizer/text_tokenizer.json,
    ROOT/tokenizer/vqgan.ckpt + vqgan.yaml. Names are ours already (transformer.py follows them);
    qk-norm parameters are one [head_dim] vector per model-parallel shard, shared by its heads.

Gemma (Liquid): `model.embed_tokens.weight`, `model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,
    down}_proj, input_layernorm, post_attention_layernorm}.weight`, `model.norm.weight`; no lm_head
    (tied to the embedding); q/k rows in rotate-half order (our RoPE pairs are interleaved, so they
    are permuted on import like Chameleon's).
Emu3 as BAAI/Emu3-*-hf holds it (transformers' convert_emu3_weights_to_hf.py): `text_model.model.*`
    (Llama names), `text_model.lm_head.weight`, `vqmodel.*` (Emu3VQVAE); transformers 5 renames
    these to `model.text_model.*`, `lm_head.weight`, `model.vqmodel.*` in memory; both are read.

Each reader returns a `WeightPlan`: what the tensors are (names in our decoder, dtype, shape: checked
before anything is allocated) and how to stream them one at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import ModelConfig
from .text import chameleon_code
from .weights import (CheckpointError, CheckpointNotFoundError, SafetensorsHeader, TensorInfo, iter_safetensors,
                      shard_headers, torch_load_weights)

HF_WEIGHTS, HF_INDEX = "model.safetensors", "model.safetensors.index.json"
VQ_PREFIX = "model.vqmodel."
VQ_PREFIXES = (VQ_PREFIX, "vqmodel.")  # Chameleon / Emu3 in memory; Emu3 on the hub
# Emu3's text model under its hub and transformers-5 names -> the Llama names the table below maps
_HF_RENAMES = (("text_model.model.", "model."), ("text_model.lm_head.", "lm_head."), ("model.text_model.", "model."))
_TORCH_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


@dataclass
class WeightPlan:
    """A checkpoint's decoder tensors (our names) and a way to stream them, without reading data."""

    files: list[Path]
    found: dict[str, TensorInfo]  # our decoder name -> dtype, shape (after the layout's transform)
    stream: Callable[[ModelConfig], Iterator[tuple[str, torch.Tensor]]]  # (our name, tensor), one at a time
    vq_keys: list[str] = field(default_factory=list)  # VQ tensors in the files (VQModel names)
    vq_tensors: Callable[[], dict[str, torch.Tensor]] = dict  # the VQ tensors (small), VQModel names
    where: dict[str, Path] = field(default_factory=dict)  # our name -> the file holding it (for errors)

    @property
    def largest_file_bytes(self) -> int:
        return max((f.stat().st_size for f in self.files), default=0)

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.found.values())

    @property
    def dtype(self) -> str:
        """The dtype holding most parameters ("BF16", "F32", ...)."""
        count: dict[str, int] = {}
        for t in self.found.values():
            count[t.dtype] = count.get(t.dtype, 0) + t.numel
        return max(count, key=count.get) if count else ""


def torch_dtype_name(dtype: torch.dtype) -> str:
    return _TORCH_DTYPE_NAMES.get(dtype, str(dtype))


# ----------------------------------------------------------------------------- vocabulary and config
def chameleon_image_token_ids(vocabulary_map: dict[str, int]) -> list[int]:
    """VQ code -> token id from the `IMGIMG<letters>Z` names (letters A-J are the code's digits)."""
    pairs = sorted((code, int(token_id)) for name, token_id in vocabulary_map.items()
                   if (code := chameleon_code(name)) is not None)
    if [c for c, _ in pairs] != list(range(len(pairs))):
        raise CheckpointError("vocabulary_map: IMGIMG names do not cover codes 0..N-1 exactly once")
    return [t for _, t in pairs]


def _vocab_special(vocab: dict[str, int], name: str) -> int | None:
    return int(vocab[name]) if name in vocab else None


def chameleon_config(vocab: dict[str, int], shape: dict[str, Any], source: str, resolution: int,
                     factor: int) -> ModelConfig:
    """The ModelConfig of a Chameleon decoder: `shape` holds the decoder fields; ids come from `vocab`
    (bos/eos/pad are the vocabulary's `<s>`, `</s>`, `<pad>`; checkpoint.py warns when config.json
    disagrees)."""
    image_ids = chameleon_image_token_ids(vocab)
    boi, eoi = _vocab_special(vocab, "<racm3:break>"), _vocab_special(vocab, "<eoss>")
    if boi is None or eoi is None:
        raise CheckpointError(f"{source}: vocabulary lacks <racm3:break> / <eoss> (Chameleon's image delimiters)")
    ids = dict(bos_id=_vocab_special(vocab, "<s>"), eos_id=_vocab_special(vocab, "</s>"),
               pad_id=_vocab_special(vocab, "<pad>"))
    for role, value in list(ids.items()):
        declared = shape.pop(role, None)  # config.json's value: used only when the vocabulary has no such token
        if value is None:
            ids[role] = declared
    try:
        return ModelConfig(
            norm="rmsnorm", qk_norm=True, qk_norm_eps=1e-5, pos_encoding="rope", mlp="swiglu",
            image_codebook_size=len(image_ids), image_seq_len=(resolution // factor) ** 2, image_token_ids=image_ids,
            boi_id=boi, eoi_id=eoi, break_id=boi, mask_id=_vocab_special(vocab, "<reserved08706>"),
            **ids, **shape)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def _hf_int(hf: dict[str, Any], key: str, default: Any) -> Any:
    value = hf.get(key, default)
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 1 << 62 else value


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    vocab = hf.get("vocabulary_map")
    if not isinstance(vocab, dict) or not vocab:
        raise CheckpointError(f"{source}: missing 'vocabulary_map' (needed for the image-token ids)")
    n_heads = _hf_int(hf, "num_attention_heads", 32)
    rope = hf.get("rope_parameters") or {}
    vq_cfg = hf.get("vq_config") or {}
    shape = dict(
        vocab_size=_hf_int(hf, "vocab_size", 65536), d_model=_hf_int(hf, "hidden_size", 4096),
        n_layers=_hf_int(hf, "num_hidden_layers", 32), n_heads=n_heads,
        n_kv_heads=_hf_int(hf, "num_key_value_heads", None) or n_heads,
        d_ff=_hf_int(hf, "intermediate_size", 11008), max_seq_len=_hf_int(hf, "max_position_embeddings", 4096),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)), swin_norm=bool(hf.get("swin_norm", False)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        bias=bool(hf.get("attention_bias", False)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_id=hf.get("bos_token_id", 1), eos_id=hf.get("eos_token_id", 2), pad_id=hf.get("pad_token_id", 1),
        source="chameleon-hf")
    factor = 2 ** (len(vq_cfg.get("channel_multiplier", [1, 1, 2, 2, 4])) - 1)
    return chameleon_config(vocab, shape, source, int(vq_cfg.get("resolution", 512)), factor)


def _llama_shape(hf: dict[str, Any], source: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The decoder fields every HF Llama-like config.json states (Gemma's, Emu3's text_config)."""
    n_heads = _hf_int(hf, "num_attention_heads", defaults["num_attention_heads"])
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return dict(
        vocab_size=_hf_int(hf, "vocab_size", defaults["vocab_size"]), d_model=_hf_int(hf, "hidden_size", 4096),
        n_layers=_hf_int(hf, "num_hidden_layers", 32), n_heads=n_heads,
        n_kv_heads=_hf_int(hf, "num_key_value_heads", None) or n_heads,
        d_ff=_hf_int(hf, "intermediate_size", 11008), max_seq_len=_hf_int(hf, "max_position_embeddings", 8192),
        norm_eps=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
        rope_theta=float(rope.get("rope_theta") or hf.get("rope_theta", defaults["rope_theta"])),
        bias=bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", defaults["tie_word_embeddings"])))


def _token_space(tok_fields: dict[str, Any], resolution: int, factor: int) -> dict[str, Any]:
    """Image ids and specials from the tokenizer (TextTokenizer.model_config_fields), and the
    number of codes of a square image at `resolution`."""
    fields = {k: v for k, v in tok_fields.items() if k not in ("vocab_size", "source", "mask_id", "infill_id")}
    return dict(fields, image_seq_len=(resolution // factor) ** 2)


def gemma_config(hf: dict[str, Any], tok_fields: dict[str, Any], source: str, resolution: int,
                 factor: int) -> ModelConfig:
    """Liquid: transformers' GemmaConfig -> ours: (1 + w) RMSNorm, GeGLU (gelu, tanh approximation),
    embeddings scaled by sqrt(hidden_size), head_dim from the config (256 in Gemma-7B), tied head."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu", "gelu_pytorch_tanh"):  # "gelu" is the legacy name of the tanh approximation
        raise CheckpointError(f"{source}: hidden_act {act!r}; a Gemma decoder uses gelu_pytorch_tanh")
    shape = _llama_shape(hf, source, dict(num_attention_heads=16, vocab_size=256000, rms_norm_eps=1e-6,
                                          rope_theta=10000.0, tie_word_embeddings=True))
    try:
        return ModelConfig(norm="rmsnorm", norm_weight_offset=1.0, mlp="geglu", pos_encoding="rope",
                           embedding_multiplier=float(shape["d_model"]) ** 0.5,
                           attn_head_dim=_hf_int(hf, "head_dim", None), source="gemma-hf",
                           **shape, **_token_space(tok_fields, resolution, factor))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def emu3_config(hf: dict[str, Any], tok_fields: dict[str, Any], source: str, resolution: int,
                factor: int) -> ModelConfig:
    """Emu3: the Llama-style `text_config` of transformers' Emu3Config -> ours (SwiGLU, RMSNorm)."""
    text = hf.get("text_config") or {}
    shape = _llama_shape(text, source, dict(num_attention_heads=32, vocab_size=184622, rms_norm_eps=1e-5,
                                            rope_theta=1000000.0, tie_word_embeddings=False))
    try:
        return ModelConfig(norm="rmsnorm", mlp="swiglu", pos_encoding="rope", source="emu3-hf",
                           **shape, **_token_space(tok_fields, resolution, factor))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------- HF names and permutation
_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}
_HF_SUB = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
           "self_attn.o_proj": "attention.wo", "self_attn.q_norm": "attention.q_normalization",
           "self_attn.k_norm": "attention.k_normalization", "mlp.gate_proj": "feed_forward.w1",
           "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
           "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}


def hf_name(key: str) -> str | None:
    """transformers' decoder name -> ours; None for VQ tensors and rotary caches; unknown names kept
    (so the strict check names them)."""
    if key.startswith(VQ_PREFIXES) or key.endswith("rotary_emb.inv_freq"):
        return None
    for old, new in _HF_RENAMES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key in _HF_TOP:
        return _HF_TOP[key]
    parts = key.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        return key
    module = ".".join(parts[3:-1])
    return f"layers.{parts[2]}.{_HF_SUB[module]}.{parts[-1]}" if module in _HF_SUB else key


def unpermute_rows(w: torch.Tensor, n_heads: int, matrix: bool) -> torch.Tensor:
    """Undo the HF conversion's q/k permutation (rotate-half order -> Meta's interleaved pairs).

    HF stored permute(w) = w.view(n, hd/2, 2, ...).transpose(1, 2); the inverse views the head's
    rows as (2, hd/2) and swaps them back. `matrix`: a projection weight [n*hd, d]; otherwise a
    bias [n*hd] or a per-head qk-norm parameter [n, hd].
    """
    trailing = tuple(w.shape[1:]) if matrix else ()
    return w.reshape(n_heads, 2, -1, *trailing).transpose(1, 2).reshape(w.shape)


def hf_transform(key: str, ours: str, value: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    matrix = key.endswith("_proj.weight")
    if ".self_attn.q_" in key:
        return unpermute_rows(value, cfg.n_heads, matrix)
    if ".self_attn.k_" in key:
        return unpermute_rows(value, cfg.n_kv_heads, matrix)
    return value


def chameleon_state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' Chameleon decoder keys -> ours, in memory (VQ keys are handled by cm3leon.vq)."""
    out = {ours: hf_transform(k, ours, v, cfg) for k, v in hf_sd.items() if (ours := hf_name(k)) is not None}
    if cfg.tie_embeddings and "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def _strip_vq(key: str) -> str:
    return next(key[len(p):] for p in VQ_PREFIXES if key.startswith(p))


def hf_weight_plan(folder: Path) -> WeightPlan:
    headers = shard_headers(folder, HF_WEIGHTS, HF_INDEX)
    found: dict[str, TensorInfo] = {}
    where: dict[str, tuple[SafetensorsHeader, str]] = {}
    vq_keys: list[str] = []
    for header in headers:
        for key, info in header.tensors.items():
            ours = hf_name(key)
            if ours is None:
                if key.startswith(VQ_PREFIXES):
                    vq_keys.append(_strip_vq(key))
                continue
            found[ours] = info
            where[ours] = (header, key)

    def stream(cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        for header in headers:
            names = [k for k in header.tensors if hf_name(k) is not None]
            for key, value in iter_safetensors(header.path, names):
                ours = hf_name(key)
                yield ours, hf_transform(key, ours, value, cfg)

    def vq_tensors() -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for header in headers:
            names = [k for k in header.tensors if k.startswith(VQ_PREFIXES)]
            out.update((_strip_vq(k), v) for k, v in iter_safetensors(header.path, names))
        return out

    return WeightPlan([h.path for h in headers], found, stream, vq_keys, vq_tensors,
                      {k: h.path for k, (h, _) in where.items()})


# ----------------------------------------------------------------------------- Meta's original release
@dataclass
class MetaRelease:
    root: Path
    model_dir: Path
    params: dict[str, Any]
    consolidated: list[Path]

    @property
    def text_tokenizer(self) -> Path:
        return self.root / "tokenizer" / "text_tokenizer.json"

    @property
    def vqgan(self) -> tuple[Path, Path]:
        return self.root / "tokenizer" / "vqgan.ckpt", self.root / "tokenizer" / "vqgan.yaml"


def find_meta_release(path: Path) -> MetaRelease | None:
    """ROOT (with one models/<size>/) or ROOT/models/<size> of Meta's release; None if not that layout."""
    if (path / "params.json").is_file():
        model_dir, root = path, path.parent.parent
    elif (path / "models").is_dir():
        sizes = sorted(p for p in (path / "models").iterdir() if (p / "params.json").is_file())
        if not sizes:
            return None
        if len(sizes) > 1:
            raise CheckpointError(f"{path}: Meta release with several models ({', '.join(p.name for p in sizes)}); "
                                  f"pass the one to load, e.g. {sizes[0]}")
        model_dir, root = sizes[0], path
    else:
        return None
    params: dict[str, Any] = {}
    for name in ("params.json", "consolidate_params.json"):
        if (model_dir / name).is_file():
            try:
                params.update(json.loads((model_dir / name).read_text()))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{model_dir / name}: not valid JSON ({e})") from None
    files = sorted(model_dir.glob("consolidated.*pth"))
    if not files:
        raise CheckpointNotFoundError(f"{model_dir}: no consolidated.pth / consolidated.NN.pth weights beside params.json")
    return MetaRelease(root, model_dir, params.get("model", params), files)


def _ffn_size(dim: int, multiplier: float, multiple_of: int) -> int:
    return multiple_of * ((int(multiplier * int(8 * dim / 3)) + multiple_of - 1) // multiple_of)


def meta_config(release: MetaRelease, vocab: dict[str, int], vq_resolution: int, vq_factor: int) -> ModelConfig:
    p, source = release.params, str(release.model_dir / "params.json")
    try:
        dim, n_heads = int(p["dim"]), int(p["n_heads"])
        shape = dict(vocab_size=int(p.get("vocab_size", 65536)), d_model=dim, n_layers=int(p["n_layers"]),
                     n_heads=n_heads, n_kv_heads=int(p.get("n_kv_heads") or n_heads),
                     d_ff=_ffn_size(dim, float(p.get("ffn_dim_multiplier") or 1), int(p.get("multiple_of", 256))),
                     max_seq_len=16384 if float(p.get("rope_theta", 10000.0)) > 10000.0 else 4096,
                     norm_eps=float(p.get("norm_eps", 1e-5)), swin_norm=bool(p.get("swin_norm", False)),
                     rope_theta=float(p.get("rope_theta", 10000.0)), source="chameleon-meta")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: expected dim, n_layers, n_heads ({e})") from None
    return chameleon_config(vocab, shape, source, vq_resolution, vq_factor)


# model-parallel split of each Meta tensor: the dim its shards are concatenated along (None: replicated)
_META_SPLIT = {"attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "attention.wo": 1, "feed_forward.w1": 0,
               "feed_forward.w3": 0, "feed_forward.w2": 1, "tok_embeddings": 1, "output": 0}


def _meta_merge(name: str, parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    if name.endswith(("q_normalization.weight", "q_normalization.bias", "k_normalization.weight",
                      "k_normalization.bias")):
        heads = cfg.n_heads if ".q_normalization." in name else cfg.n_kv_heads
        per = [t.reshape(-1, cfg.head_dim) for t in parts]  # one [hd] per shard (or per head, if expanded)
        stacked = torch.cat(per)
        return stacked.repeat_interleave(heads // stacked.shape[0], 0) if heads % stacked.shape[0] == 0 else stacked
    module = name.rsplit(".", 1)[0]
    key = module.split(".", 2)[-1] if module.startswith("layers.") else module
    dim = _META_SPLIT.get(key)
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts, dim=dim) if dim is not None else torch.stack(parts).float().mean(0).to(parts[0].dtype)


def meta_weight_plan(release: MetaRelease, cfg_for_shapes: Callable[[], ModelConfig]) -> WeightPlan:
    """Consolidated torch files, memory-mapped (weights_only=True). Shapes are read from the mapped
    tensors (no data touched); model-parallel shards are merged one tensor at a time."""
    shards = [torch_load_weights(f, mmap=True) for f in release.consolidated]
    for f, sd in zip(release.consolidated, shards):
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{f}: expected a dict of tensors (Meta's consolidated checkpoint)")
    cfg = cfg_for_shapes()
    names = [k for k in shards[0] if not k.endswith("rope.freqs")]
    found: dict[str, TensorInfo] = {}
    for name in names:
        metas = [sd[name].to("meta") for sd in shards if name in sd]
        if len(metas) != len(shards):
            raise CheckpointError(f"{release.model_dir}: tensor {name} is missing from some consolidated shards")
        merged = _meta_merge(name, metas, cfg)
        found[name] = TensorInfo(torch_dtype_name(merged.dtype) if merged.is_floating_point() else str(merged.dtype),
                                 tuple(merged.shape))

    def stream(cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, _meta_merge(name, [sd[name] for sd in shards], cfg)

    return WeightPlan(list(release.consolidated), found, stream,
                      where={k: release.consolidated[0] for k in found})
