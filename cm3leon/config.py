"""ModelConfig: one dataclass for the CM3leon (OPT-style), Chameleon / Emu3 (LLaMA-style) and Liquid (Gemma)
decoders."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch


# Sane upper bounds, checked before anything is allocated: a config.json that says
# vocab_size=1e12 or n_layers=1e6 is a one-line error, not a traceback or 7 GB of RAM.
# The largest public decoders (Chameleon-34B, LLaMA-405B) sit far inside these.
SHAPE_BOUNDS: dict[str, int] = {
    "vocab_size": 1 << 22, "d_model": 1 << 16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
    "d_ff": 1 << 20, "max_seq_len": 1 << 20, "image_codebook_size": 1 << 20, "image_seq_len": 1 << 16,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bound_problems(cfg: "ModelConfig") -> list[str]:
    problems = []
    for name, hi in SHAPE_BOUNDS.items():
        value = getattr(cfg, name)
        if not _is_int(value):
            problems.append(f"{name}={value!r} is not an integer")
        elif not 1 <= value <= hi:
            problems.append(f"{name}={value} is outside the sane range 1..{hi}")
    if cfg.attn_head_dim is not None and not (_is_int(cfg.attn_head_dim) and 1 <= cfg.attn_head_dim <= 1 << 12):
        problems.append(f"attn_head_dim={cfg.attn_head_dim!r} is not an integer in 1..{1 << 12}")
    if not _is_int(cfg.image_token_offset):
        problems.append(f"image_token_offset={cfg.image_token_offset!r} is not an integer")
    return problems


@dataclass
class ModelConfig:
    # --- decoder shape
    vocab_size: int = 1024
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # GQA; None = n_heads
    d_ff: int | None = None  # None: 4*d (gelu/relu) or LLaMA's 2/3*4*d rounded to 256 (swiglu)
    max_seq_len: int = 4096
    # --- variant switches. CM3leon: layernorm (no affine), learned positions, no qk-norm.
    # Chameleon: rmsnorm, rope, qk-norm (LayerNorm over head_dim with per-head weight+bias), swiglu.
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    norm_affine: bool = True  # CM3leon has no learnable norm parameters
    norm_weight_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + w), in float32
    qk_norm: bool = False
    qk_norm_eps: float = 1e-5  # Chameleon fixes this at 1e-5 whatever rms_norm_eps is
    swin_norm: bool = False  # Chameleon-30B: normalise the sublayer output instead of its input
    pos_encoding: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    mlp: Literal["swiglu", "geglu", "gelu", "relu"] = "swiglu"  # geglu: Gemma's gelu(tanh)-gated MLP
    embedding_multiplier: float = 1.0  # Gemma: sqrt(d_model), applied in the embedding's dtype
    attn_head_dim: int | None = None  # None: d_model // n_heads (Gemma-7B: 256 with d_model 3072, 16 heads)
    bias: bool = False
    tie_embeddings: bool = False
    # --- token space (see docs/INTERFACES.md)
    image_codebook_size: int = 256
    image_seq_len: int = 64
    image_token_offset: int = 0
    image_token_ids: list[int] | None = None  # code c -> token id; None = offset + c
    bos_id: int | None = None
    eos_id: int = 0
    pad_id: int = 0
    boi_id: int = 0
    eoi_id: int = 0
    break_id: int = 0
    mask_id: int | None = None
    infill_id: int | None = None
    # free-form provenance ("native", "chameleon-hf", ...); not used by the math
    source: str = "native"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None and _is_int(self.d_model):  # otherwise validate() names d_model
            if self.mlp in ("swiglu", "geglu"):
                hidden = int(2 * (4 * self.d_model) / 3)
                self.d_ff = 256 * ((hidden + 255) // 256)
            else:
                self.d_ff = 4 * self.d_model
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim if self.attn_head_dim is not None else self.d_model // self.n_heads

    def validate(self) -> None:
        problems = _bound_problems(self)
        if problems:  # a shape that cannot be allocated: stop before the arithmetic below uses it
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        if self.attn_head_dim is None and self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            problems.append(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.image_token_ids is not None and len(self.image_token_ids) != self.image_codebook_size:
            problems.append(
                f"image_token_ids has {len(self.image_token_ids)} entries, image_codebook_size={self.image_codebook_size}"
            )
        ids = self.image_token_ids if self.image_token_ids is not None else [
            self.image_token_offset, self.image_token_offset + self.image_codebook_size - 1]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            problems.append(f"image token ids fall outside the vocabulary of {self.vocab_size}")
        for name in ("bos_id", "eos_id", "pad_id", "boi_id", "eoi_id", "break_id", "mask_id", "infill_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                problems.append(f"{name}={v} is outside the vocabulary of {self.vocab_size}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    # --- token-space helpers
    def image_token_id_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor [codebook]: VQ code -> token id."""
        if self.image_token_ids is not None:
            return torch.tensor(self.image_token_ids, dtype=torch.long, device=device)
        return torch.arange(self.image_codebook_size, device=device) + self.image_token_offset

    def token_to_code_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor [vocab]: token id -> VQ code, -1 for tokens that are not image codes."""
        table = torch.full((self.vocab_size,), -1, dtype=torch.long, device=device)
        table[self.image_token_id_tensor(device)] = torch.arange(self.image_codebook_size, device=device)
        return table

    def is_image_token_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
        mask[self.image_token_id_tensor(device)] = True
        return mask

    # --- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ModelConfig field(s) {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"model config not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))
