"""Checkpoints: inspect and load the native folder, HF-layout folders (Chameleon / Anole / Lumina-mGPT,
Liquid, Emu3: the family detected from config.json, cm3leon/families.py) and Meta's original
Chameleon release; save the native folder.

Native folder:
    config.json          {"format": "cm3eval-native", "model": ModelConfig, "image_resolution": int, ...}
    model.safetensors    decoder weights (names as in transformer.py = Meta's original names)
    vq.safetensors       VQ-GAN (cm3leon.vq.save_native)
    tokenizer.json       `tokenizers` BPE with image-code and special tokens (cm3leon.text)
    encoder.safetensors  optional dual encoder for retrieval / CLIP-style scores (cm3leon.encoder)
    bank/                optional retrieval memory bank (cm3leon.retrieval)
The HF and Meta layouts are described in cm3leon/layouts.py.

`inspect` reads only small files (config/params JSON, the safetensors index and headers, the
tokenizer) and says what a checkpoint can do, so a run can be refused before any weight is read.
`load` checks the config against sane bounds and the weights' own shapes and dtypes first, then
builds the decoder on the meta device, allocates it once on the target device in the target dtype
and streams the tensors into it one at a time from memory-mapped files.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import partial
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import families
from . import vq as vq_lib
from .config import ModelConfig
from .errors import Cm3evalError
from .layouts import (MetaRelease, WeightPlan, chameleon_image_token_ids,  # noqa: F401  (re-exported names)
                      chameleon_state_dict_from_hf, emu3_config, find_meta_release, gemma_config, hf_weight_plan,
                      meta_config, meta_weight_plan, model_config_from_hf, unpermute_rows)
from .text import TextTokenizer
from .transformer import Transformer, rope_tables
from .weights import CheckpointError, CheckpointNotFoundError, check_against, iter_safetensors, read_header, stream_into

NATIVE_FORMAT = "cm3eval-native"
ZOO = Path(__file__).parent / "zoo"
ALIASES = {"demo": ZOO / "shapes-demo"}
_unpermute_rows = unpermute_rows  # the name older callers used

__all__ = ["ModelBundle", "CheckpointInfo", "CheckpointError", "CheckpointNotFoundError", "MissingVQDecoderError",
           "CheckpointWarning", "inspect", "load", "save", "resolve", "fingerprint_folder", "ALIASES"]


class CheckpointWarning(UserWarning):
    """Something in a checkpoint that is used with a correction (e.g. config.json's bos disagrees with the tokenizer)."""


class MissingVQDecoderError(Cm3evalError):
    """A task needs to decode images and the checkpoint has no VQ decoder."""


@dataclass
class CheckpointInfo:
    """What a checkpoint is and can do, read from small files only."""

    path: Path
    layout: str  # "native" | "hf" | "meta"
    family: str  # a name of cm3leon.families.FAMILIES ("cm3leon", "chameleon", "lumina-mgpt", "liquid", "emu3")
    config: ModelConfig
    image_resolution: int
    n_params: int
    dtype: str  # safetensors name of the dtype holding most parameters ("BF16", "F32", ...)
    files: list[Path]  # decoder weight files
    largest_file_bytes: int
    has_vq_encoder: bool
    has_vq_decoder: bool
    has_encoder: bool  # a dual encoder in the folder (retrieval / CLIP-style scores); Chameleon has none
    has_bank: bool  # a retrieval memory bank in the folder
    vq_source: Path | None = None  # where the VQ weights come from (the folder's own, or --vq)
    tokenizer_file: Path | None = None

    def describe(self) -> str:
        """One line: what was found at the path (the plan prints it before anything loads)."""
        side = int(round(self.config.image_seq_len ** 0.5))
        return (f"model: {self.path} ({self.family}, {self.layout} layout, {self.n_params / 1e6:,.1f}M parameters "
                f"in {self.dtype}; images {self.image_resolution} px, {side}x{side} codes)")

    def require_vq_decoder(self, what: str = "this task decodes images") -> None:
        """Raise the one-line error a plan shows before loading when images must be decoded."""
        if not self.has_vq_decoder:
            why = ("transformers' Chameleon conversion drops it" if self.layout == "hf" else
                   "no vq.safetensors in the folder" if self.layout == "native" else "tokenizer/vqgan.ckpt is missing")
            raise MissingVQDecoderError(
                f"{self.path}: {what} but the checkpoint has no VQ decoder ({why}); "
                "pass --vq PATH (Meta's tokenizer/vqgan.ckpt, with vqgan.yaml beside it)")


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
    info: CheckpointInfo | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def family(self) -> str:
        if self.info is not None:
            return self.info.family
        return "chameleon" if self.tokenizer.layout == "chameleon" else "cm3leon"


# ----------------------------------------------------------------------------- resolving and fingerprints
def resolve(path_or_alias: str | Path) -> Path:
    if str(path_or_alias) in ALIASES:
        path = ALIASES[str(path_or_alias)]
        if not (path / "config.json").is_file():
            raise CheckpointNotFoundError(
                f"the demo model is not in {path}; rebuild it with `cm3eval train demo` (it ships with the package)")
        return path
    path = Path(path_or_alias).expanduser()
    if not path.is_dir():
        raise CheckpointNotFoundError(
            f"model folder not found: {path} (expected config.json, weights and tokenizer.json, or Meta's release "
            "with models/ and tokenizer/)")
    if not (path / "config.json").is_file() and find_meta_release(path) is None:
        raise CheckpointNotFoundError(f"{path / 'config.json'}: missing; a model folder needs config.json "
                                      "(or Meta's release layout: models/<size>/params.json)")
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
        raise CheckpointNotFoundError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _tokenizer(file: Path) -> TextTokenizer:
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file}: tokenizer missing; a model folder needs its tokenizer.json")
    return _tokenizer_from(file)


def _tokenizer_from(file: Path, appended_codes: int = 0) -> TextTokenizer:
    try:
        return TextTokenizer.from_file(file, appended_codes=appended_codes)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


# ----------------------------------------------------------------------------- the plan of one checkpoint
@dataclass
class _Plan:
    """Everything known before reading weights: layout, config, tokenizer, tensors, VQ source."""

    path: Path
    layout: str
    config: ModelConfig
    tokenizer: TextTokenizer
    tokenizer_file: Path
    weights: WeightPlan
    image_resolution: int
    vq_config: vq_lib.VQConfig | None = None  # for VQ tensors inside the weight files (HF)
    vq_file: Path | None = None  # native vq.safetensors, or Meta's vqgan.ckpt
    vq_yaml: Path | None = None
    has_vq_decoder: bool = False
    family: str = ""  # cm3leon.families name; "" = from the tokenizer's layout
    emu3_vq: dict[str, Any] | None = None  # Emu3's vq_config (its VQ is transformers' Emu3VQVAE)


def _reconcile_special_ids(cfg: ModelConfig, tok: TextTokenizer, declared: dict[str, Any], source: str) -> None:
    """bos/eos/pad are the tokenizer's; a config file that says otherwise is warned about, naming both."""
    for role in ("bos", "eos", "pad"):
        vocab_id = tok.special_ids.get(role)
        if vocab_id is None:
            continue
        said = declared.get(role)
        if said is not None and said != vocab_id:
            warnings.warn(f"{source}: {role}_token_id={said} disagrees with the tokenizer's "
                          f"{tok.id_to_token(vocab_id)}={vocab_id}; using {vocab_id}", CheckpointWarning, stacklevel=3)
        setattr(cfg, f"{role}_id", vocab_id)
    cfg.validate()


def _check_tokenizer(tok: TextTokenizer, cfg: ModelConfig, source: Path) -> None:
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{source}: tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size}")
    ids = tok.image_token_ids()
    if ids and ids != cfg.image_token_id_tensor().tolist():
        raise CheckpointError(f"{source}: the tokenizer's image-code tokens do not match the config's image token ids")


def _native_plan(path: Path, meta: dict[str, Any]) -> _Plan:
    cfg_file = path / "config.json"
    if "model" not in meta:
        raise CheckpointError(f"{cfg_file}: missing field 'model'")
    try:
        cfg = ModelConfig.from_dict(meta["model"], source=f"{cfg_file}: model")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: model: {e}") from None
    tok = _tokenizer(path / "tokenizer.json")
    _check_tokenizer(tok, cfg, path / "tokenizer.json")
    _reconcile_special_ids(cfg, tok, {r: meta["model"].get(f"{r}_id") for r in ("bos", "eos", "pad")}, str(cfg_file))
    header = read_header(path / "model.safetensors")
    found = dict(header.tensors)

    def stream(_cfg: ModelConfig):
        return iter_safetensors(header.path)

    vq_file = path / vq_lib.VQ_FILENAME
    has_decoder = False
    if vq_file.is_file():
        has_decoder = json.loads(read_header(vq_file).metadata.get("has_decoder", "true")) is True
    plan = WeightPlan([header.path], found, stream, where={k: header.path for k in found})
    return _Plan(path, "native", cfg, tok, path / "tokenizer.json", plan, int(meta.get("image_resolution", 64)),
                 vq_file=vq_file if vq_file.is_file() else None, has_vq_decoder=has_decoder)


def _hf_plan(path: Path, hf: dict[str, Any]) -> _Plan:
    source = str(path / "config.json")
    cfg = model_config_from_hf(hf, source)
    tok = _tokenizer(path / "tokenizer.json")
    if tok.image_token_ids() and tok.image_token_ids() != cfg.image_token_ids:
        raise CheckpointError(f"{path / 'tokenizer.json'}: IMGIMG tokens disagree with config.json's vocabulary_map")
    _check_tokenizer(tok, cfg, path / "tokenizer.json")
    _reconcile_special_ids(cfg, tok, {r: hf.get(f"{r}_token_id") for r in ("bos", "eos", "pad")}, source)
    weights = hf_weight_plan(path)
    vq_cfg = None
    if weights.vq_keys:
        vq_cfg = vq_lib.VQConfig.from_hf_dict(hf.get("vq_config") or {}, source=f"{source}: vq_config")
    resolution = int((hf.get("vq_config") or {}).get("resolution", 512))
    return _Plan(path, "hf", cfg, tok, path / "tokenizer.json", weights, resolution, vq_config=vq_cfg,
                 has_vq_decoder=any(k.startswith("decoder.") for k in weights.vq_keys))


def _meta_plan(release: MetaRelease) -> _Plan:
    tok = _tokenizer(release.text_tokenizer)
    ckpt, yaml_file = release.vqgan
    vq_cfg = vq_lib.VQConfig.from_taming_yaml(yaml_file) if yaml_file.is_file() else vq_lib.VQConfig()
    vocab = tok.vocab()
    cfg = meta_config(release, vocab, vq_cfg.resolution, vq_cfg.downsample_factor)
    _check_tokenizer(tok, cfg, release.text_tokenizer)
    _reconcile_special_ids(cfg, tok, {}, str(release.model_dir / "params.json"))
    weights = meta_weight_plan(release, lambda: cfg)
    has_vq = ckpt.is_file() and yaml_file.is_file()
    return _Plan(release.model_dir, "meta", cfg, tok, release.text_tokenizer, weights, vq_cfg.resolution,
                 vq_file=ckpt if has_vq else None, vq_yaml=yaml_file if has_vq else None, has_vq_decoder=has_vq)


def _tokenizer_names(file: Path) -> set[str]:
    """Every token name of a tokenizer.json (read as JSON: detection happens before the tokenizer
    is built, since Liquid's needs to know how many codes follow its vocabulary)."""
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file}: tokenizer missing; a model folder needs its tokenizer.json")
    data = _read_json(file)
    names = set((data.get("model") or {}).get("vocab") or {})
    return names | {t.get("content") for t in data.get("added_tokens") or [] if isinstance(t, dict)}


def _open_family_plan(path: Path, hf: dict[str, Any], family: families.Family, vq: str | Path | None) -> _Plan:
    """Liquid (Gemma) and Emu3: the decoder config from config.json, ids from tokenizer.json.
    Liquid's images are Chameleon's VQGAN's: its grid is the one `vq`'s vqgan.yaml describes
    (Meta's: 512 px, 16x downsampling, 1024 codes), which is also the default."""
    source, tok_file = str(path / "config.json"), path / "tokenizer.json"
    weights = hf_weight_plan(path)
    if family.loader == "gemma":  # Liquid: Chameleon's VQGAN codes after the text vocabulary, 512 px
        n_text = len(_tokenizer_names(tok_file))
        tok = _tokenizer_from(tok_file, appended_codes=int(hf.get("vocab_size", 0)) - n_text)
        yaml_file = resolve_vq(vq)[1] if vq is not None else None
        vq_cfg = vq_lib.VQConfig.from_taming_yaml(yaml_file) if yaml_file is not None else vq_lib.VQConfig()
        resolution = vq_cfg.resolution
        cfg = gemma_config(hf, tok.model_config_fields(), source, resolution, vq_cfg.downsample_factor)
        has_decoder, emu3_vq = False, None
    else:  # Emu3: its own VQ (vq_config) inside the weights; image_area as in BAAI/Emu3-Gen's config
        tok = _tokenizer_from(tok_file)
        emu3_vq = dict(hf.get("vq_config") or {})
        factor = 2 ** (len(emu3_vq.get("channel_multiplier", [1, 2, 2, 4])) - 1)
        resolution = int(round(float(hf.get("image_area", 518400)) ** 0.5))
        cfg = emu3_config(hf, tok.model_config_fields(), source, resolution, factor)
        has_decoder = any(k.startswith("decoder.") for k in weights.vq_keys)
    _check_tokenizer(tok, cfg, tok_file)
    _reconcile_special_ids(cfg, tok, {}, source)
    return _Plan(path, "hf", cfg, tok, tok_file, weights, resolution, has_vq_decoder=has_decoder, emu3_vq=emu3_vq)


def _plan(path: Path, family: str | None = None, vq: str | Path | None = None, image_size: int | None = None) -> _Plan:
    """`family`: a cm3leon.families name overriding detection from config.json (--family);
    `vq`: the --vq file (Liquid's image grid is its VQGAN's); `image_size`: --image-size."""
    plan = _read_plan(path, family, vq)
    # a native folder or Meta's release: the family its tokenizer is written in
    plan.family = plan.family or families.detect(plan.tokenizer).name
    _set_image_size(plan, families.get(plan.family), image_size)
    return plan


def _set_image_size(plan: _Plan, family: families.Family, requested: int | None) -> None:
    """The side of the square images the model reads and writes: --image-size, else (Lumina-mGPT) the
    size its checkpoint's name carries (config.json has none: Alpha-VLLM/Lumina-mGPT-7B-768 is run at
    FlexARInferenceSolver(target_size=768)), else the checkpoint's own. A family trained at one size
    takes no other; the grid scales with the side at the VQ's downsampling factor."""
    native = plan.image_resolution
    side = requested
    if side is None and family.image_size_in_name:
        found = [m for part in reversed(plan.path.resolve().parts)
                 if (m := re.search(family.image_size_in_name, part, re.IGNORECASE))]
        if not found:
            raise CheckpointError(
                f"{plan.path}: a {family.name} checkpoint's image size is in its name ({family.image_size_example}), "
                f"not in config.json, and no folder of this path carries it; pass --image-size N "
                f"(the N of the checkpoint's hub name)")
        side = int(found[0].group(1))
    if side is None or side == native:
        return
    if not family.flexible_image_size:
        raise CheckpointError(f"--image-size {side}: the {family.name} family generates {native} px images only")
    codes = int(round(plan.config.image_seq_len ** 0.5))
    factor = native // codes
    unit = factor * (family.grid_codes if "grid" in family.image else 1)
    if side <= 0 or side % unit:
        raise CheckpointError(f"--image-size {side}: a {family.name} image side is a multiple of {unit} px "
                              f"(the checkpoint's own is {native} px)")
    plan.image_resolution = side
    plan.config.image_seq_len = (side // factor) ** 2


def _read_plan(path: Path, family: str | None, vq: str | Path | None) -> _Plan:
    if not (path / "config.json").is_file():
        release = find_meta_release(path)
        if release is not None:
            return _meta_plan(release)
    meta = _read_json(path / "config.json")
    if meta.get("format") == NATIVE_FORMAT:
        return _native_plan(path, meta)
    if not (family or meta.get("model_type") or meta.get("architectures")):
        raise CheckpointError(f"{path / 'config.json'}: unknown checkpoint format (neither 'format': "
                              f"'{NATIVE_FORMAT}' nor an HF config with 'model_type' / 'architectures')")
    try:
        names = partial(_tokenizer_names, path / "tokenizer.json")  # read only for a Gemma config
        fam = families.get(family) if family else families.from_config(meta, names)
    except ValueError as e:
        raise CheckpointError(f"--family {family}: {e}" if family else f"{path / 'config.json'}: {e}") from None
    plan = _hf_plan(path, meta) if fam.loader == "chameleon" else _open_family_plan(path, meta, fam, vq)
    plan.family = fam.name
    plan.tokenizer.layout = fam.detected_by[0]  # so codecs built from the tokenizer write this family
    return plan


def resolve_vq(vq: str | Path) -> tuple[Path, Path | None]:
    """`--vq PATH` -> (weights file, taming YAML or None for a native vq.safetensors). PATH is Meta's
    vqgan.ckpt (vqgan.yaml beside it), a folder holding them, or a native vq.safetensors."""
    p = Path(vq).expanduser()
    if p.is_dir():
        if (p / vq_lib.VQ_FILENAME).is_file():
            return p / vq_lib.VQ_FILENAME, None
        p = p / "vqgan.ckpt"
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise CheckpointNotFoundError(f"--vq {p}: file not found")
        return p, None
    yaml_file = p.with_suffix(".yaml")
    for f, what in ((p, "VQ-GAN checkpoint"), (yaml_file, "VQ-GAN config")):
        if not f.is_file():
            raise CheckpointNotFoundError(
                f"--vq: {what} not found: {f} (Meta's Chameleon release ships tokenizer/vqgan.ckpt and "
                "tokenizer/vqgan.yaml; request access at https://ai.meta.com/resources/models-and-libraries/chameleon-downloads/)")
    return p, yaml_file


def _info(plan: _Plan, vq: str | Path | None) -> CheckpointInfo:
    has_decoder, vq_source = plan.has_vq_decoder, plan.vq_file
    has_vq_encoder = bool(plan.weights.vq_keys) or plan.vq_file is not None
    if vq is not None:
        vq_source, _ = resolve_vq(vq)
        has_decoder = has_vq_encoder = True
        if vq_source.suffix == ".safetensors":
            has_decoder = json.loads(read_header(vq_source).metadata.get("has_decoder", "true")) is True
    native = plan.layout == "native"
    return CheckpointInfo(
        path=plan.path, layout=plan.layout,
        family=plan.family,
        config=plan.config, image_resolution=plan.image_resolution, n_params=plan.weights.n_params,
        dtype=plan.weights.dtype, files=list(plan.weights.files), largest_file_bytes=plan.weights.largest_file_bytes,
        has_vq_encoder=has_vq_encoder, has_vq_decoder=has_decoder,
        has_encoder=native and (plan.path / "encoder.safetensors").is_file(),
        has_bank=native and (plan.path / "bank" / "bank.json").is_file(),
        vq_source=vq_source, tokenizer_file=plan.tokenizer_file)


def inspect(path_or_alias: str | Path, *, vq: str | Path | None = None, family: str | None = None,
            image_size: int | None = None) -> CheckpointInfo:
    """What a checkpoint is and can do, from its small files only (no tensor data is read)."""
    return _info(_plan(resolve(path_or_alias), family, vq, image_size), vq)


# ----------------------------------------------------------------------------- the decoder, streamed
def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the decoder `cfg` describes, computed on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


def build_decoder(cfg: ModelConfig, weights: WeightPlan, source: str, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Transformer:
    """Check the tensors against the config, allocate the decoder once on `device` in `dtype`, stream."""
    found = dict(weights.found)
    if cfg.tie_embeddings:
        found.pop("output.weight", None)  # the tied copy some writers keep; the embedding fills both
    check_against(expected_shapes(cfg), found, source, "the decoder described by the config", weights.where)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    if cfg.pos_encoding == "rope":  # non-persistent buffers: computed, not loaded
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        model.rope_cos, model.rope_sin = cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)
    skip = {"output.weight"} if cfg.tie_embeddings else set()
    filled = stream_into(model, weights.stream(cfg), source, rename=lambda k: None if k in skip else k)
    unfilled = sorted(set(dict(model.named_parameters())) - filled)
    if unfilled:
        raise CheckpointError(f"{source}: tensor(s) {', '.join(unfilled[:3])} were never filled")
    return model.eval()


def _load_vq(plan: _Plan, vq: str | Path | None, device: str | torch.device) -> vq_lib.VQModel | None:
    own: vq_lib.VQModel | None = None
    if plan.emu3_vq is not None and plan.weights.vq_keys:  # transformers' Emu3VQVAE (the emu3 extra)
        from .emu3_vq import Emu3VQ

        return Emu3VQ(plan.emu3_vq, plan.image_resolution, plan.weights.vq_tensors(), str(plan.path)).to(device)
    if plan.weights.vq_keys:
        own = vq_lib.load_hf_vq(plan.weights.vq_tensors(), plan.vq_config, str(plan.path))
    elif plan.vq_file is not None and plan.vq_yaml is None:
        own = vq_lib.load_native(plan.vq_file, device="cpu")
    elif plan.vq_file is not None and vq is None:
        own = vq_lib.load_taming_checkpoint(plan.vq_file, plan.vq_yaml)
    if vq is None:
        return own.to(device).eval() if own is not None else None
    file, yaml_file = resolve_vq(vq)
    ext = vq_lib.load_native(file, device="cpu") if yaml_file is None else vq_lib.load_taming_checkpoint(file, yaml_file)
    if own is not None:
        mine, theirs = own.quantize.embedding.weight, ext.quantize.embedding.weight
        if mine.shape != theirs.shape or not torch.equal(mine.float(), theirs.float()):
            raise CheckpointError(f"--vq {file}: its codebook differs from the checkpoint's own VQ tokenizer in "
                                  f"{plan.path}; these are not the image tokens this model was trained on")
    return ext.to(device).eval()


def load(path_or_alias: str | Path = "demo", *, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, with_encoder: bool = True, vq: str | Path | None = None,
         family: str | None = None, image_size: int | None = None) -> ModelBundle:
    """Load a native folder, an HF-layout folder (Chameleon / Anole / Lumina-mGPT / Liquid / Emu3,
    detected from config.json, or `family`) or Meta's release.
    `vq`: Meta's vqgan.ckpt (+ vqgan.yaml) or a vq.safetensors to decode images with;
    `image_size`: the side of the images generated and read (Lumina-mGPT, Emu3 take any multiple of
    their patch)."""
    path = resolve(path_or_alias)
    plan = _plan(path, family, vq, image_size)
    info = _info(plan, vq)
    model = build_decoder(plan.config, plan.weights, str(plan.path), device=device, dtype=dtype)
    vq_model = _load_vq(plan, vq, device)
    encoder = None
    if with_encoder and info.has_encoder:
        from .encoder import NativeDualEncoder  # optional part of a native bundle

        encoder = NativeDualEncoder.load(path / "encoder.safetensors").to(device).eval()
    bundle = ModelBundle(plan.config, model, plan.tokenizer, vq_model, plan.image_resolution, path,
                         encoder=encoder, bank_dir=path / "bank" if info.has_bank else None, info=info)
    bundle.fingerprint = fingerprint_folder(path)
    return bundle


# ----------------------------------------------------------------------------- native format
def save(bundle: ModelBundle, path: str | Path) -> Path:
    """Write the native folder (the decoder's tensors are gathered on the host once, as safetensors needs)."""
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
    del state
    if bundle.vq is not None:
        vq_lib.save_native(bundle.vq, path / vq_lib.VQ_FILENAME)
    bundle.tokenizer.save(path / "tokenizer.json")
    if bundle.encoder is not None and hasattr(bundle.encoder, "save"):
        bundle.encoder.save(path / "encoder.safetensors")
    return path
