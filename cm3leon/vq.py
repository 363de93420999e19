"""VQ-GAN image tokenizer in the taming-transformers layout.

This is the image tokenizer of Make-A-Scene / CM3leon / Chameleon: a convolutional
encoder, a nearest-neighbour codebook and a convolutional decoder. Parameter names
follow taming-transformers (the layout of Meta's Chameleon `vqgan.ckpt` and of
transformers' `ChameleonVQVAE`), so those checkpoints load without renaming:

  encoder.conv_in, encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut},
  encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}, encoder.down.{i}.downsample.conv,
  encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out,
  quant_conv, quantize.embedding.weight, post_quant_conv,
  decoder.conv_in, decoder.mid.*, decoder.up.{i}.{block,attn,upsample}, decoder.norm_out, decoder.conv_out

Pixels are [B,3,H,W] floats in [-1,1]; codes are row-major LongTensors [B, h*w].
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from PIL import Image

from .errors import Cm3evalError
from .weights import load_strict, read_safetensors, torch_load_weights


class VQError(Cm3evalError, ValueError):
    """A VQ-GAN config or weights file that cannot be used (one line: file and why)."""


class VQNotFoundError(Cm3evalError, FileNotFoundError):
    """A VQ-GAN file that is not where it was looked for."""


class NoVQDecoderError(Cm3evalError, RuntimeError):
    """Decoding was asked of VQ weights that carry no decoder."""

VQ_FILENAME = "vq.safetensors"
_NATIVE_FORMAT = "cm3eval-vq/1"


# ----------------------------------------------------------------------------- config
_VQ_BOUNDS = {"resolution": 1 << 14, "in_channels": 64, "out_channels": 64, "base_channels": 4096,
              "num_res_blocks": 64, "latent_channels": 1 << 14, "embed_dim": 1 << 14, "num_embeddings": 1 << 20}


@dataclass
class VQConfig:
    resolution: int = 512
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_multiplier: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    dropout: float = 0.0
    latent_channels: int = 256  # taming's z_channels
    embed_dim: int = 256
    num_embeddings: int = 8192
    beta: float = 0.25
    legacy: bool = True  # taming's (buggy) placement of beta, which all released VQ-GANs trained with
    double_latent: bool = False  # taming's double_z; only meaningful for KL autoencoders
    attn_type: str = "vanilla"  # "vanilla" | "none" (mid attention replaced by identity)

    def __post_init__(self) -> None:
        self.channel_multiplier = [int(m) for m in self.channel_multiplier]
        self.attn_resolutions = [int(r) for r in (self.attn_resolutions or [])]
        self.validate()

    def validate(self) -> None:
        # sane bounds first: a vq_config saying base_channels=1e6 would otherwise allocate before failing
        problems = [f"{name}={getattr(self, name)!r} is outside the sane range 1..{hi}"
                    for name, hi in _VQ_BOUNDS.items()
                    if not isinstance(getattr(self, name), int) or not 1 <= getattr(self, name) <= hi]
        if len(self.channel_multiplier) > 12 or any(not 1 <= m <= 64 for m in self.channel_multiplier):
            problems.append(f"channel_multiplier={self.channel_multiplier} is outside the sane range (<= 12 levels of 1..64)")
        if problems:
            raise VQError("invalid VQConfig: " + "; ".join(problems))
        if not self.channel_multiplier:
            problems.append("channel_multiplier is empty")
        if self.double_latent:
            problems.append("double_latent=True is a KL-autoencoder option; a VQ model has one latent")
        if self.attn_type not in ("vanilla", "none"):
            problems.append(f"attn_type={self.attn_type!r} is not 'vanilla' or 'none'")
        # GroupNorm(32) runs on every feature map
        for ch in [self.base_channels] + [self.base_channels * m for m in self.channel_multiplier]:
            if ch % 32:
                problems.append(f"channel count {ch} is not divisible by 32 (GroupNorm groups)")
                break
        if self.channel_multiplier and self.resolution % self.downsample_factor:
            problems.append(f"resolution {self.resolution} is not divisible by the downsample factor {self.downsample_factor}")
        for name in ("resolution", "in_channels", "out_channels", "num_res_blocks", "latent_channels", "embed_dim", "num_embeddings"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise VQError("invalid VQConfig: " + "; ".join(problems))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downsample_factor

    @property
    def tokens_per_image(self) -> int:
        return self.latent_size**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "VQ config") -> "VQConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VQError(f"{source}: unknown VQConfig field(s) {unknown}")
        return cls(**data)

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], *, source: str = "vq_config") -> "VQConfig":
        """From transformers' ChameleonVQVAEConfig dict (config.json's `vq_config`)."""
        keys = ("embed_dim", "num_embeddings", "double_latent", "latent_channels", "resolution", "in_channels",
                "base_channels", "channel_multiplier", "num_res_blocks", "attn_resolutions", "dropout", "attn_type")
        args = {k: data[k] for k in keys if k in data and data[k] is not None}
        try:
            return cls(**args)
        except (TypeError, ValueError) as e:
            raise VQError(f"{source}: {e}") from None

    @classmethod
    def from_taming_yaml(cls, path: str | Path) -> "VQConfig":
        """From a taming-transformers model YAML (Meta's Chameleon `vqgan.yaml`)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise VQNotFoundError(
                f"VQ-GAN config not found: {path} (Meta's Chameleon release ships it as tokenizer/vqgan.yaml)") from None
        except yaml.YAMLError as e:
            raise VQError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        try:
            params = data["model"]["params"]
            dd = dict(params["ddconfig"])
            n_embed, embed_dim = int(params["n_embed"]), int(params["embed_dim"])
        except (KeyError, TypeError):
            raise VQError(f"{path}: expected model.params.{{ddconfig,n_embed,embed_dim}} (taming VQModel YAML)") from None
        # options of taming's Encoder/Decoder that change the network; only their defaults are implemented
        defaults = {"resamp_with_conv": True, "give_pre_end": False, "tanh_out": False, "use_linear_attn": False}
        for key, want in defaults.items():
            if key in dd and dd.pop(key) != want:
                raise VQError(f"{path}: ddconfig.{key} other than {want} is not supported")
        rename = {"ch": "base_channels", "ch_mult": "channel_multiplier", "z_channels": "latent_channels",
                  "double_z": "double_latent", "out_ch": "out_channels"}
        direct = {"resolution", "in_channels", "num_res_blocks", "attn_resolutions", "dropout", "attn_type"}
        args: dict[str, Any] = {}
        for key, value in dd.items():
            if key in rename:
                args[rename[key]] = value
            elif key in direct:
                args[key] = value
            else:
                raise VQError(f"{path}: unknown ddconfig key {key!r}")
        args.update(num_embeddings=n_embed, embed_dim=embed_dim)
        for key in ("beta", "legacy"):  # not in Meta's YAML (taming hard-codes them) but honoured if present
            if key in params:
                args[key] = params[key]
        try:
            return cls(**args)
        except (TypeError, ValueError) as e:
            raise VQError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- network


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (1x1 convs as projections)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = _norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # [B, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), as taming
        return x + self.proj_out(out.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # taming pads right/bottom only (torch convs pad symmetrically)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(ch: int, cfg: VQConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(ch, ch, cfg.dropout)
    mid.attn_1 = AttnBlock(ch) if cfg.attn_type == "vanilla" else nn.Identity()
    mid.block_2 = ResnetBlock(ch, ch, cfg.dropout)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        mult = cfg.channel_multiplier
        ch = cfg.base_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, block_in = cfg.resolution, ch
        for level, m in enumerate(mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * m, cfg.dropout))
                block_in = ch * m
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != len(mult) - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = _mid(block_in, cfg)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for j, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        mult = cfg.channel_multiplier
        ch = cfg.base_channels
        block_in = ch * mult[-1]
        res = cfg.latent_size
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, cfg)
        stages: list[nn.Module] = []
        for level in reversed(range(len(mult))):  # lowest resolution first, as the data flows
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * mult[level], cfg.dropout))
                block_in = ch * mult[level]
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            stages.append(stage)
        self.up = nn.ModuleList(stages[::-1])  # indexed by level, as in taming's checkpoints
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for j, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[j](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.beta, self.legacy = cfg.beta, cfg.legacy
        self.embedding = nn.Embedding(cfg.num_embeddings, cfg.embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.num_embeddings, 1.0 / cfg.num_embeddings)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,D,h,w] -> nearest code per position, LongTensor [B, h*w] (row-major)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        e = self.embedding.weight
        # |z-e|^2 = |z|^2 + |e|^2 - 2 z.e, in the same order as taming so ties resolve identically
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return d.argmin(1).view(z.shape[0], -1)

    def lookup(self, codes: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """codes [B, h*w] -> quantized latents [B,D,h,w]."""
        return self.embedding(codes).view(codes.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = self.codes(z)
        zq = self.lookup(codes, z.shape[2], z.shape[3])
        commit = F.mse_loss(zq.detach(), z)  # pulls the encoder to the codebook
        embed = F.mse_loss(zq, z.detach())  # pulls the codebook to the encoder
        # taming's legacy=True puts beta on the codebook term (a historical bug kept by every release)
        loss = commit + self.beta * embed if self.legacy else self.beta * commit + embed
        zq = z + (zq - z).detach()  # straight-through estimator
        return zq, loss, codes


class VQModel(nn.Module):
    def __init__(self, config: VQConfig, *, with_decoder: bool = True) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        self.quantize = VectorQuantizer(config)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        # transformers' Chameleon checkpoints carry no decoder; such a model can only encode
        self.decoder = Decoder(config) if with_decoder else None
        self.source = "initialised"  # where the weights came from, for error messages

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        f = self.config.downsample_factor
        if pixels.ndim != 4 or pixels.shape[1] != self.config.in_channels:
            raise VQError(f"VQ encode expects pixels [B,{self.config.in_channels},H,W], got {tuple(pixels.shape)}")
        if pixels.shape[2] % f or pixels.shape[3] % f:
            raise VQError(f"VQ encode: image size {tuple(pixels.shape[2:])} is not divisible by the downsample factor {f}")

    def _latents(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check_pixels(pixels)
        pixels = pixels.to(dtype=self.quant_conv.weight.dtype, device=self.quant_conv.weight.device)
        return self.quant_conv(self.encoder(pixels))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,H,W] in [-1,1] -> codes LongTensor [B, (H/f)*(W/f)], row-major."""
        return self.quantize.codes(self._latents(pixels))

    def decode_latents(self, zq: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise NoVQDecoderError(
                f"VQ weights from {self.source} have no decoder (transformers' Chameleon conversion drops it); "
                "attach Meta's original vqgan.ckpt to decode images (--vq PATH, or cm3leon.load(..., vq=PATH))")
        return self.decoder(self.post_quant_conv(zq))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """codes [B, h*w] (or [h*w]) -> pixels [B,3,H,W] in [-1,1]. shape=(h,w) defaults to a square grid."""
        if codes.ndim == 1:
            codes = codes[None]
        if codes.ndim != 2 or codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise VQError(f"VQ decode expects integer codes [B, h*w], got {codes.dtype} {tuple(codes.shape)}")
        n = codes.shape[1]
        if shape is None:
            side = math.isqrt(n)
            if side * side != n:
                raise VQError(f"VQ decode: {n} codes do not form a square grid; pass shape=(h, w)")
            shape = (side, side)
        if shape[0] * shape[1] != n:
            raise VQError(f"VQ decode: shape {shape} does not hold {n} codes")
        K = self.config.num_embeddings
        if n and (int(codes.min()) < 0 or int(codes.max()) >= K):
            raise VQError(f"VQ decode: codes must lie in [0, {K}), got [{int(codes.min())}, {int(codes.max())}]")
        codes = codes.long().to(self.quantize.embedding.weight.device)
        out = self.decode_latents(self.quantize.lookup(codes, *shape))
        return out.clamp(-1.0, 1.0)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, quantizer loss, codes [B, h*w])."""
        zq, qloss, codes = self.quantize(self._latents(pixels))
        return self.decode_latents(zq), qloss, codes

    def load_weights(self, state_dict: dict[str, Any], source: str) -> "VQModel":
        load_strict(self, state_dict, source, "the VQ model")
        self.source = source
        return self


# ----------------------------------------------------------------------------- images


def _whiten(img: Image.Image) -> Image.Image:
    """RGB image; transparent pixels are blended on white (as Chameleon does)."""
    if img.mode == "RGB":
        return img
    rgba = np.asarray(img.convert("RGBA"))
    if (rgba[..., 3] == 255).all():
        return img.convert("RGB")
    alpha = rgba[..., 3:4] / 255.0
    rgb = (1.0 - alpha) * 255.0 + alpha * rgba[..., :3]
    return Image.fromarray(rgb.astype(np.uint8), "RGB")  # truncation, as Chameleon


def preprocess(images: Iterable[Image.Image] | Image.Image, resolution: int) -> torch.Tensor:
    """PIL images -> [B,3,R,R] in [-1,1]: alpha on white, short side to R (LANCZOS), center crop."""
    if isinstance(images, Image.Image):
        images = [images]
    out = []
    for img in images:
        if not isinstance(img, Image.Image):
            raise TypeError(f"preprocess expects PIL images, got {type(img).__name__}")
        img = _whiten(img)
        if min(img.size) == 0:
            raise VQError(f"preprocess: empty image of size {img.size}")
        scale = resolution / min(img.size)
        size = (max(resolution, round(scale * img.width)), max(resolution, round(scale * img.height)))
        if size != img.size:
            img = img.resize(size, Image.LANCZOS)
        x0, y0 = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((x0, y0, x0 + resolution, y0 + resolution))
        arr = np.asarray(img, dtype=np.float64) / 255.0 * 2.0 - 1.0
        out.append(torch.from_numpy(arr).permute(2, 0, 1).float())
    if not out:
        return torch.empty(0, 3, resolution, resolution)
    return torch.stack(out)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] (or [3,H,W]) in [-1,1] -> RGB PIL images (rounded, so preprocess->to_pil is lossless)."""
    if pixels.ndim == 3:
        pixels = pixels[None]
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise VQError(f"to_pil expects [B,3,H,W] pixels, got {tuple(pixels.shape)}")
    arr = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB") for a in arr]


# ----------------------------------------------------------------------------- loading


def load_taming_checkpoint(ckpt_path: str | Path, config: VQConfig | str | Path) -> VQModel:
    """Meta's original Lightning `vqgan.ckpt` (state_dict key; the GAN loss's `loss.*` tensors dropped)."""
    path = Path(ckpt_path)
    if not isinstance(config, VQConfig):
        config = VQConfig.from_taming_yaml(config)
    if not path.is_file():
        raise VQNotFoundError(
            f"VQ-GAN checkpoint not found: {path} (Meta's Chameleon release ships it as tokenizer/vqgan.ckpt; "
            "request access at https://ai.meta.com/resources/models-and-libraries/chameleon-downloads/)")
    ckpt = torch_load_weights(path)
    if not isinstance(ckpt, dict):
        raise VQError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    sd = ckpt.get("state_dict", ckpt)  # Lightning nests the weights; a bare state dict is accepted too
    if not isinstance(sd, dict):
        raise VQError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a dict of tensors")
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    return VQModel(config).load_weights(sd, str(path)).eval()


_HF_PREFIXES = ("model.vqmodel.", "vqmodel.")


def hf_vq_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Chameleon keys (`model.vqmodel.*`, or a bare ChameleonVQVAE) -> ours. Other keys dropped."""
    for prefix in _HF_PREFIXES:
        if any(k.startswith(prefix) for k in hf_state_dict):
            return {k[len(prefix):]: v for k, v in hf_state_dict.items() if k.startswith(prefix)}
    if any(k.startswith("encoder.") for k in hf_state_dict):  # already a bare VQ state dict
        return dict(hf_state_dict)
    raise VQError("no VQ tensors found: expected keys under 'model.vqmodel.' (transformers' Chameleon layout)")


def load_hf_vq(hf_state_dict: dict[str, torch.Tensor], config: VQConfig, source: str) -> VQModel:
    """Encoder-only VQModel from transformers' Chameleon weights (they carry no decoder)."""
    sd = hf_vq_state_dict(hf_state_dict)
    with_decoder = any(k.startswith("decoder.") for k in sd)
    return VQModel(config, with_decoder=with_decoder).load_weights(sd, source).eval()


def _native_path(path: str | Path) -> Path:
    path = Path(path)
    return path / VQ_FILENAME if path.is_dir() or path.suffix != ".safetensors" else path


def save_native(model: VQModel, path: str | Path) -> Path:
    """Write `vq.safetensors` (path is the file or its folder); the config rides in the metadata."""
    from safetensors.torch import save_file

    path = _native_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": _NATIVE_FORMAT, "config": json.dumps(model.config.to_dict()),
            "has_decoder": json.dumps(model.has_decoder)}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_native(path: str | Path, device: torch.device | str = "cpu") -> VQModel:
    """Read a `vq.safetensors` written by save_native (path is the file or its folder)."""
    path = _native_path(path)
    if not path.is_file():
        raise VQNotFoundError(
            f"VQ weights not found: {path} (write one with cm3leon.vq.save_native, e.g. after "
            "load_taming_checkpoint on Meta's vqgan.ckpt, or train the demo tokenizer with `cm3eval train`)")
    sd, meta = read_safetensors(path, device=str(device))
    if meta.get("format") != _NATIVE_FORMAT or "config" not in meta:
        raise VQError(f"{path}: no cm3eval VQ metadata (format={meta.get('format')!r}); write it with save_native")
    try:
        config = VQConfig.from_dict(json.loads(meta["config"]), source=str(path))
        with_decoder = bool(json.loads(meta.get("has_decoder", "true")))
    except json.JSONDecodeError as e:
        raise VQError(f"{path}: VQ config metadata is not valid JSON ({e})") from None
    model = VQModel(config, with_decoder=with_decoder).to(device)
    return model.load_weights(sd, str(path)).eval()
