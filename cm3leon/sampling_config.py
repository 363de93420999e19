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
# THE bounds of the sampler's settings: field -> (accepts the value, what it accepts in words);
# None is accepted where a field is optional (unset). tasks/spec.py words its messages from here.
# The rules across fields (temperature > 0 unless greedy; mix_cdk_fraction needs cdk_alpha; jacobi without CD-K)
# are checked after the table, in validate().
BOUNDS: dict[str, tuple] = {
    "greedy": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (_is_number, "a number > 0 (or greedy: true)"),
    "top_k": (lambda v: v is None or (_is_count(v) and v >= 1), "an integer >= 1"),
    "top_p": (lambda v: v is None or (_is_number(v) and 0 < v <= 1), "a number in (0, 1]"),
    "cfg_scale": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "image_cfg_scale": (lambda v: v is None or (_is_number(v) and v >= 0), "a number >= 0"),
    "cdk_alpha": (lambda v: v is None or (_is_number(v) and 0 < v <= 1), "a number in (0, 1]"),
    "cdk_k": (lambda v: _is_count(v) and v >= 1, "an integer >= 1"),
    "mix_cdk_fraction": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1] (and cdk_alpha set)"),
    "n_candidates": (lambda v: _is_count(v) and v >= 1, "an integer >= 1"),
    "decoding": (lambda v: v in DECODINGS, "ar or jacobi (jacobi: image tasks, no CD-K)"),
    "jacobi_window": (lambda v: _is_count(v) and 2 <= v <= JACOBI_WINDOW_MAX, "an integer in [2, 128]"),
}


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
        """THE validation of sampling settings (the plan phase calls it before a model loads): every
        field against BOUNDS, then the two rules across fields.

        Raises ValueError whose message starts with the offending field's name."""
        for name, (accepts, words) in BOUNDS.items():
            value = getattr(self, name)
            if not accepts(value):
                raise ValueError(f"{name}: must be {words}, got {value!r}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0 (use greedy=true for argmax), got {self.temperature}")
        if self.mix_cdk_fraction > 0 and self.cdk_alpha is None:
            raise ValueError("mix_cdk_fraction: needs cdk_alpha (the CD-K candidates' plausibility cut)")
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
