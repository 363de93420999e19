"""Dual encoders for retrieval: text and images into one L2-normalised space.

CM3leon retrieves with a DPR-style bi-encoder on a frozen CLIP ViT-B-32: the text and
the image of a document are encoded separately, each normalised, and averaged (then
normalised again, so inner product = cosine). `encode_documents` is that rule.

Backends, all behind the `DualEncoder` protocol:
  native    NativeDualEncoder — a small CNN + byte-level transformer trained on the demo
            world (64x64 shapes, short captions); save/load as one safetensors file.
  open_clip any open_clip architecture (ViT-B-32 ...) from a LOCAL checkpoint file.
  hf-clip   transformers' CLIPModel from a LOCAL folder (what torchmetrics' CLIPScore uses).
Nothing here downloads. `load_encoder("native:PATH" | "open_clip:ARCH:PATH" | "hf-clip:DIR")`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

NATIVE_FILENAME = "encoder.safetensors"
_NATIVE_FORMAT = "cm3eval-dual-encoder/1"
_ENCODE_BATCH = 256  # rows per forward inside encode_*; bounds activation memory


@runtime_checkable
class DualEncoder(Protocol):
    name: str
    dim: int

    def encode_text(self, texts: list[str]) -> torch.Tensor: ...  # [N,D] float32, L2-normalised, CPU

    def encode_image(self, images: list[Image.Image]) -> torch.Tensor: ...  # [N,D] float32, L2-normalised, CPU

    def fingerprint(self) -> str: ...  # kind + config + weights hash; equal iff the vectors are comparable


def encode_documents(encoder: DualEncoder, texts: Sequence[str | None], images: Sequence[Image.Image | None]) -> torch.Tensor:
    """One vector per document: normalise(mean(normalised text, normalised image)) when it has both
    parts (the paper's rule), else the normalised vector of the part it has. -> [N,D] float32."""
    if len(texts) != len(images):
        raise ValueError(f"encode_documents: {len(texts)} texts but {len(images)} images")
    n = len(texts)
    out = torch.zeros(n, encoder.dim, dtype=torch.float32)
    has_t = [i for i, t in enumerate(texts) if t is not None]
    has_i = [i for i, im in enumerate(images) if im is not None]
    empty = sorted(set(range(n)) - set(has_t) - set(has_i))
    if empty:
        raise ValueError(f"encode_documents: document {empty[0]} has neither text nor image")
    if has_t:
        out[has_t] += encoder.encode_text([texts[i] for i in has_t]).float()
    if has_i:
        out[has_i] += encoder.encode_image([images[i] for i in has_i]).float()
    # the mean of two unit vectors, renormalised, equals their normalised sum
    return F.normalize(out, dim=-1)


def contrastive_loss(img_vecs: torch.Tensor, txt_vecs: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): row i of images matches row i of texts. Inputs L2-normalised [B,D];
    `logit_scale` is the log of the temperature's inverse, as in CLIP, capped at 100 like CLIP's
    training (an uncapped scale runs away on small batches)."""
    scale = logit_scale.exp().clamp(max=100.0) if isinstance(logit_scale, torch.Tensor) else min(math.exp(logit_scale), 100.0)
    logits = scale * img_vecs @ txt_vecs.t()
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and raw bytes: the same weights give the same hash
    whichever file format they came from."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def _rgb(im: Image.Image) -> Image.Image:
    """Alpha composited on white (as Chameleon does), anything else converted to RGB."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


# ----------------------------------------------------------------------------- native encoder


@dataclass
class NativeEncoderConfig:
    image_size: int = 64
    image_channels: tuple[int, ...] = (32, 64, 128, 256)  # one stride-2 conv block each
    text_vocab: int = 258  # 0 = pad, 1..256 = byte+1, 257 = start token (no sequence is empty)
    text_max_len: int = 64  # bytes kept per text; the demo captions are far shorter
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    dim: int = 128  # shared embedding space
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's initial temperature

    def __post_init__(self) -> None:
        self.image_channels = tuple(int(c) for c in self.image_channels)
        if self.text_dim % self.text_heads:
            raise ValueError(f"NativeEncoderConfig: text_dim={self.text_dim} not divisible by text_heads={self.text_heads}")
        if self.image_size % (2 ** len(self.image_channels)):
            raise ValueError(f"NativeEncoderConfig: image_size={self.image_size} not divisible by 2**{len(self.image_channels)}")
        if self.text_vocab < 258:
            raise ValueError(f"NativeEncoderConfig: text_vocab={self.text_vocab} < 258 (bytes + pad + start)")

    @classmethod
    def from_dict(cls, d: dict) -> "NativeEncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"NativeEncoderConfig: unknown fields {unknown}")
        return cls(**d)


class _Block(nn.Module):
    """Pre-norm transformer block; padding handled by an explicit attention mask."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class NativeDualEncoder(nn.Module):
    """Small dual encoder for the demo world. `encode_*` are inference entry points (no grad,
    normalised, CPU float32); training uses `text_inputs`/`image_inputs` + `forward_*` + `loss`."""

    def __init__(self, cfg: NativeEncoderConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or NativeEncoderConfig()
        self.name = "native"
        self.dim = cfg.dim
        convs, c_in = [], 3
        for c in cfg.image_channels:
            convs += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8 if c % 8 == 0 else 1, c), nn.GELU()]
            c_in = c
        self.image_tower = nn.Sequential(*convs)
        self.image_proj = nn.Linear(c_in, cfg.dim)
        self.tok_emb = nn.Embedding(cfg.text_vocab, cfg.text_dim)
        self.pos_emb = nn.Embedding(cfg.text_max_len + 1, cfg.text_dim)  # +1: the start token
        self.blocks = nn.ModuleList([_Block(cfg.text_dim, cfg.text_heads) for _ in range(cfg.text_layers)])
        self.text_norm = nn.LayerNorm(cfg.text_dim)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))

    # --- inputs
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def text_inputs(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Byte-level ids [B,T] (start token first, 0-padded) and a bool validity mask [B,T]."""
        rows = [[257] + [b + 1 for b in t.encode("utf-8")[: self.cfg.text_max_len]] for t in texts]
        t_max = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), t_max, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids.to(self.device), (ids != 0).to(self.device)

    def image_inputs(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Short side resized to image_size (bicubic), centre crop, [-1,1] -> [B,3,S,S]."""
        s = self.cfg.image_size
        out = []
        for im in images:
            im = _rgb(im)
            w, h = im.size
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - s) // 2, (nh - s) // 2
            im = im.crop((left, top, left + s, top + s))
            out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1))
        x = torch.stack(out).float().div_(127.5).sub_(1.0)
        return x.to(self.device)

    # --- differentiable towers
    def forward_text(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok_emb(ids) + self.pos_emb(pos)
        mask = valid[:, None, None, :]  # keys only: padded rows still attend to their valid keys
        for blk in self.blocks:
            x = blk(x, mask)
        x = self.text_norm(x)
        w = valid.unsqueeze(-1).to(x.dtype)
        pooled = (x * w).sum(1) / w.sum(1)  # mean over valid tokens: padding never changes a vector
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward_image(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.image_tower(pixels).mean(dim=(2, 3))
        return F.normalize(self.image_proj(feats), dim=-1)

    def loss(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        img = self.forward_image(self.image_inputs(images))
        txt = self.forward_text(*self.text_inputs(texts))
        return contrastive_loss(img, txt, self.logit_scale)

    # --- DualEncoder protocol
    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            parts = [self.forward_text(*self.text_inputs(texts[i : i + _ENCODE_BATCH])) for i in range(0, len(texts), _ENCODE_BATCH)]
        finally:
            self.train(was)
        return torch.cat(parts).float().cpu() if parts else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def encode_image(self, images: list[Image.Image]) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            parts = [self.forward_image(self.image_inputs(images[i : i + _ENCODE_BATCH])) for i in range(0, len(images), _ENCODE_BATCH)]
        finally:
            self.train(was)
        return torch.cat(parts).float().cpu() if parts else torch.zeros(0, self.dim)

    def fingerprint(self) -> str:
        # Not cached: an optimizer changes the weights (and so the vectors) without telling us;
        # hashing this small model costs milliseconds.
        cfg_json = json.dumps(asdict(self.cfg), sort_keys=True)
        return f"native:cfg={hashlib.sha256(cfg_json.encode()).hexdigest()[:12]}:w={state_hash(self.state_dict())[:16]}"

    # --- files
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (config JSON in its metadata). A folder -> folder/encoder.safetensors."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path.mkdir(parents=True, exist_ok=True)
            path = path / NATIVE_FILENAME
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": _NATIVE_FORMAT, "config": json.dumps(asdict(self.cfg))}
        save_file(state, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "NativeDualEncoder":
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / NATIVE_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: native encoder file not found (write one with NativeDualEncoder.save)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        if meta.get("format") != _NATIVE_FORMAT:
            raise ValueError(f"{path}: metadata format is {meta.get('format')!r}, expected {_NATIVE_FORMAT!r} (not a native encoder file)")
        try:
            cfg = NativeEncoderConfig.from_dict(json.loads(meta["config"]))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: bad encoder config in metadata: {e}") from None
        model = cls(cfg)
        expected = model.state_dict()
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            raise ValueError(f"{path}: tensors do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
        for k, v in expected.items():
            if state[k].shape != v.shape or state[k].dtype != v.dtype:
                raise ValueError(f"{path}: tensor {k} is {tuple(state[k].shape)} {state[k].dtype}, expected {tuple(v.shape)} {v.dtype}")
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()


# ----------------------------------------------------------------------------- open_clip


def _load_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch file via weights_only=True; unwraps {'state_dict': ...} and DDP 'module.'."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); TorchScript/pickled checkpoints are refused — "
                             "convert to .safetensors on a trusted machine") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state_dict)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


class OpenCLIPEncoder:
    """open_clip model (default ViT-B-32, CM3leon's retriever) from a local checkpoint file, with
    open_clip's own eval preprocessing and tokenizer."""

    def __init__(self, arch: str, path: str | Path, device: str | torch.device = "cpu") -> None:
        try:
            import open_clip
        except ImportError:
            raise ImportError("the open_clip encoder needs open_clip: pip install 'cm3eval[clip]'") from None
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: open_clip checkpoint not found. Nothing is downloaded at run time: on a connected machine get "
                f"the hub weights for {arch} (e.g. ViT-B-32 'laion2b_s34b_b79k': huggingface.co/laion/"
                "CLIP-ViT-B-32-laion2B-s34B-b79K, file open_clip_model.safetensors or open_clip_pytorch_model.bin) and "
                "pass its local path")
        if arch not in open_clip.list_models():
            raise ValueError(f"open_clip has no architecture {arch!r} (see open_clip.list_models())")
        # random init, then our weights; open_clip would log "no pretrained weights loaded" for that
        prev = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device="cpu")
        finally:
            logging.disable(prev)
        state = _load_torch_state(path)
        # the two fixes open_clip's own loader applies to older checkpoints
        if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
            state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
            state = open_clip.convert_to_custom_text_state_dict(state)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: weights do not fit open_clip {arch}: {str(e).splitlines()[0]} "
                             f"({len(state)} tensors in the file)") from None
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = torch.device(device)
        self.arch = arch
        self.name = f"open_clip:{arch}"
        self.dim = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None \
            else int(self.encode_text(["a"]).shape[1])
        self._fingerprint = f"open_clip:{arch}:w={state_hash(model.state_dict())[:16]}"

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        parts = [self.model.encode_text(self.tokenizer(list(texts[i : i + _ENCODE_BATCH])).to(self.device), normalize=True)
                 for i in range(0, len(texts), _ENCODE_BATCH)]
        return torch.cat(parts).float().cpu() if parts else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def encode_image(self, images: list[Image.Image]) -> torch.Tensor:
        parts = []
        for i in range(0, len(images), _ENCODE_BATCH):
            x = torch.stack([self.preprocess(_rgb(im)) for im in images[i : i + _ENCODE_BATCH]]).to(self.device)
            parts.append(self.model.encode_image(x, normalize=True))
        return torch.cat(parts).float().cpu() if parts else torch.zeros(0, self.dim)

    def fingerprint(self) -> str:
        return self._fingerprint


# ----------------------------------------------------------------------------- transformers CLIP


class HFCLIPEncoder:
    """transformers' CLIPModel + CLIP preprocessing from a local folder (save_pretrained layout);
    the encoder torchmetrics' CLIPScore uses, so scores can be matched."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder}: no CLIP folder here (config.json missing). Nothing is downloaded at run time: on a connected "
                "machine run `huggingface-cli download openai/clip-vit-base-patch32 --local-dir DIR` and pass DIR")
        try:
            from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
        except ImportError:
            raise ImportError("the hf-clip encoder needs transformers: pip install transformers") from None
        try:
            model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder}: cannot load a CLIP model and tokenizer from this folder: {str(e).splitlines()[0]}") from None
        if (folder / "preprocessor_config.json").is_file():
            processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
        else:  # CLIP's standard eval transform at the model's resolution
            s = model.config.vision_config.image_size
            processor = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        self.model = model.to(device).eval()
        self.tokenizer, self.processor = tokenizer, processor
        self.device = torch.device(device)
        self.max_len = int(model.config.text_config.max_position_embeddings)
        self.name = f"hf-clip:{folder.name}"
        self.dim = int(model.config.projection_dim)
        cfg_hash = hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()[:12]
        self._fingerprint = f"hf-clip:cfg={cfg_hash}:w={state_hash(model.state_dict())[:16]}"

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers < 5 returns the projected tensor; >= 5 a model output whose pooler_output is projected
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        parts = []
        for i in range(0, len(texts), _ENCODE_BATCH):
            enc = self.tokenizer(list(texts[i : i + _ENCODE_BATCH]), padding=True, truncation=True,
                                 max_length=self.max_len, return_tensors="pt").to(self.device)
            feats = self._features(self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
            parts.append(F.normalize(feats.float(), dim=-1))
        return torch.cat(parts).cpu() if parts else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def encode_image(self, images: list[Image.Image]) -> torch.Tensor:
        parts = []
        for i in range(0, len(images), _ENCODE_BATCH):
            px = self.processor(images=[_rgb(im) for im in images[i : i + _ENCODE_BATCH]], return_tensors="pt")["pixel_values"]
            feats = self._features(self.model.get_image_features(pixel_values=px.to(self.device)))
            parts.append(F.normalize(feats.float(), dim=-1))
        return torch.cat(parts).cpu() if parts else torch.zeros(0, self.dim)

    def fingerprint(self) -> str:
        return self._fingerprint


# ----------------------------------------------------------------------------- factory


def load_encoder(spec: str, device: str | torch.device = "cpu") -> DualEncoder:
    """`native:PATH` | `open_clip:ARCH:PATH` | `hf-clip:DIR`."""
    kind, _, rest = spec.partition(":")
    if kind == "native" and rest:
        return NativeDualEncoder.load(rest, device=device)
    if kind == "open_clip":
        arch, _, path = rest.partition(":")
        if arch and path:
            return OpenCLIPEncoder(arch, path, device=device)
    if kind == "hf-clip" and rest:
        return HFCLIPEncoder(rest, device=device)
    raise ValueError(f"encoder spec {spec!r}: expected native:PATH, open_clip:ARCH:PATH (e.g. open_clip:ViT-B-32:/w/clip.safetensors) or hf-clip:DIR")
