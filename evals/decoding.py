"""metrics.json's record of a run decoded other than by the published protocol's plain
autoregressive loop (`generation.decoding`), with the sampler's counters.

Speculative Jacobi decoding keeps plain decoding's distribution in exact arithmetic, but its
tokens differ per seed and its numerics differ (windows of tokens per forward), so a run with it is
recorded as a deviation from the published protocol beside what it bought: forwards per image
(the decode forwards of the image's batch, its sequential cost) and accepted tokens per forward
(each image's tokens over the forwards it needed itself).
"""

from __future__ import annotations

from typing import Any


def decoding_entry(spec: Any, records: list[dict]) -> dict[str, Any] | None:
    """The task entry's "decoding" block, or None for plain decoding (the protocol's)."""
    g = getattr(spec, "generation", None)
    if g is None or getattr(g, "decoding", "ar") == "ar" or getattr(spec, "output_modality", "") != "image":
        return None
    counted = [r["extra"] for r in records if "forwards" in (r.get("extra") or {})]
    entry: dict[str, Any] = {"decoding": g.decoding, "jacobi_window": g.jacobi_window,
                             "deviation": f"generation.decoding {g.decoding!r} with window {g.jacobi_window} "
                                          f"(published: 'ar')"}
    if counted:
        entry["forwards_per_image"] = sum(e["forwards"] for e in counted) / len(counted)
        entry["accepted_tokens_per_forward"] = sum(e["tokens"] for e in counted) / sum(e["own_forwards"] for e in counted)
        entry["n_counted"] = len(counted)
    return entry


def plain_decoding_hash(task: dict[str, Any]) -> None:
    """Leave the decoding fields out of a plain-decoding task's hashed config: they change nothing
    there, so plain runs keep the hash they resume under."""
    gen = task.get("generation") or {}
    if gen.get("decoding", "ar") == "ar":
        gen.pop("decoding", None)
        gen.pop("jacobi_window", None)
