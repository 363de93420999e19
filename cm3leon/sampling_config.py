"""The sampler's settings and their ONE validation, without torch.

`SamplingConfig` is what tasks/spec.py's `GenerationSpec` extends and what the plan phase
validates before any model loads; living here (not in cm3leon/sampling.py, which imports torch)
keeps a usage error such as `--set generation.temperature=0` under a second. cm3leon/sampling.py
re-exports it (`from .sampling_config import SamplingConfig`), so there is one class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


DECODINGS = ("ar", "jacobi")
JACOBI_WINDOW_MAX = 128


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    cfg_scale: float = 1.0  # text guidance: uncond + s * (cond - uncond)
    image_cfg_scale: float | None = None  # 3-stream editing guidance when set
    cdk_alpha: float | None = None  # contrastive decoding TopK (CD-K) when set
    cdk_k: int = 1
    mix_cdk_fraction: float = 0.0  # share of a request's candidates decoded with CD-K
    n_candidates: int = 1
    # image tokens: "ar" (one token per forward, the published protocol) or "jacobi" (speculative
    # Jacobi decoding, arXiv 2410.01699: a window of drafted tokens verified per forward, the same
    # distribution). Text requests always decode with "ar".
    decoding: str = "ar"
    jacobi_window: int = 16  # tokens fed per forward (the last accepted + drafts); SJD's default 16

    def validate(self) -> None:
        """THE validation of sampling settings (the plan phase calls it before a model loads).

        Raises ValueError whose message starts with the offending field's name."""
        if not isinstance(self.greedy, bool):
            raise ValueError(f"greedy: must be true or false, got {self.greedy!r}")
        if not _is_number(self.temperature):
            raise ValueError(f"temperature: must be a finite number, got {self.temperature!r}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0 (use greedy=true for argmax), got {self.temperature}")
        if self.top_k is not None and not (_is_count(self.top_k) and self.top_k >= 1):
            raise ValueError(f"top_k: must be an integer >= 1 (or unset), got {self.top_k!r}")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: must be in (0, 1] (or unset), got {self.top_p!r}")
        if not _is_number(self.cfg_scale):
            raise ValueError(f"cfg_scale: must be a finite number (1 = no guidance), got {self.cfg_scale!r}")
        if self.image_cfg_scale is not None and not _is_number(self.image_cfg_scale):
            raise ValueError(f"image_cfg_scale: must be a finite number (or unset), got {self.image_cfg_scale!r}")
        if self.cdk_alpha is not None and not (_is_number(self.cdk_alpha) and 0 < self.cdk_alpha <= 1):
            raise ValueError(f"cdk_alpha: must be in (0, 1] (or unset to turn CD-K off), got {self.cdk_alpha!r}")
        if not (_is_count(self.cdk_k) and self.cdk_k >= 1):
            raise ValueError(f"cdk_k: must be an integer >= 1, got {self.cdk_k!r}")
        if not (_is_number(self.mix_cdk_fraction) and 0 <= self.mix_cdk_fraction <= 1):
            raise ValueError(f"mix_cdk_fraction: must be in [0, 1], got {self.mix_cdk_fraction!r}")
        if self.mix_cdk_fraction > 0 and self.cdk_alpha is None:
            raise ValueError("mix_cdk_fraction: needs cdk_alpha (the CD-K candidates' plausibility cut)")
        if not (_is_count(self.n_candidates) and self.n_candidates >= 1):
            raise ValueError(f"n_candidates: must be an integer >= 1, got {self.n_candidates!r}")
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding: must be one of {', '.join(DECODINGS)}, got {self.decoding!r}")
        if not (_is_count(self.jacobi_window) and 2 <= self.jacobi_window <= JACOBI_WINDOW_MAX):
            raise ValueError(f"jacobi_window: must be an integer in [2, {JACOBI_WINDOW_MAX}], got {self.jacobi_window!r}")
        if self.decoding == "jacobi" and self.cdk_alpha is not None:
            raise ValueError("decoding: jacobi does not verify CD-K's contrast scores; use decoding=ar with cdk_alpha")

    @property
    def needs_uncond(self) -> bool:
        """Whether decoding reads an unconditional stream (CFG, CD-K's amateur, 3-stream edit)."""
        return self.cfg_scale != 1.0 or self.cdk_alpha is not None or self.image_cfg_scale is not None

    def uses_cdk(self, candidate: int) -> bool:
        if self.cdk_alpha is None:
            return False
        if self.mix_cdk_fraction <= 0:
            return True
        return candidate < round(self.mix_cdk_fraction * self.n_candidates)
