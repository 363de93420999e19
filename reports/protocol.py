"""The protocol manifest of one task of a run: the settings that make two numbers comparable.

Two runs of a task can only be compared (compare), and a measured row can only sit beside a
paper's number (leaderboard), when they were measured the same way: the same task version,
split, number of samples, candidates per prompt, retrieved documents, shots, resolution,
data, and metric options. The model and its sampling settings are NOT protocol: they are
what a comparison is about.

The manifest is read from what the run recorded: config.json's resolved task spec and
metrics.json's task entry (including a "protocol" object and the protocol-like `extra`
fields of each metric, e.g. FID's resolution and reference set, VQA's evaluation version).
"""

from __future__ import annotations

import json
from typing import Any

# Metric options that name a file or a batch size: they differ between machines without
# changing the number (a changed file shows in the recorded fingerprints instead).
_NOT_PROTOCOL_OPTIONS = {"weights", "cache_dir", "batch_size", "reference_stats", "bootstrap"}
# `extra` fields of a metric that describe how it was measured (not what it measured).
_EXTRA_KEYS = {"protocol", "resolution", "tokenize", "variant", "convention", "scale_w", "turns", "evaluation",
               "official", "encoder", "pool_size", "reference", "reference_set", "manifest", "feature_space"}

# Short names of the fields the leaderboard shows and footnotes.
HEADLINE = ("split", "n", "candidates", "k", "shots", "resolution")


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def _scalar(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v, sort_keys=True, default=str)


def _flat(prefix: str, v: Any, out: dict[str, Any]) -> None:
    if isinstance(v, dict):
        for k, x in v.items():
            _flat(f"{prefix}.{k}", x, out)
    elif v is not None:
        out[prefix] = _scalar(v)


def _resolution(spec: dict[str, Any], entry: dict[str, Any]) -> Any:
    for m in (entry.get("metrics") or {}).values():
        r = _get(m, "extra", "resolution")
        if r is not None:
            return r
    for opts in (_get(spec, "metrics") or {}).values():
        if isinstance(opts, dict) and opts.get("resolution") is not None:
            return opts["resolution"]
    return None


def manifest(entry: dict[str, Any], cfg: dict[str, Any] | None) -> dict[str, Any]:
    """{field: value} for one task of one run; fields the run did not record are absent."""
    spec = (cfg or {}).get("task") if isinstance((cfg or {}).get("task"), dict) else {}
    retrieval = _get(spec, "retrieval") or {}
    out: dict[str, Any] = {
        "task version": entry.get("task_version", _get(spec, "version")),
        "split": _get(spec, "dataset", "split"),
        "n": entry.get("n_samples"),
        "candidates": _get(spec, "generation", "n_candidates"),
        "k": (retrieval.get("k") if retrieval.get("enabled") else 0) if retrieval else None,
        "shots": _get(spec, "prompt", "k_shot"),
        "resolution": _resolution(spec, entry),
        "data": entry.get("data_fingerprint"),
    }
    out = {k: _scalar(v) for k, v in out.items() if v is not None and v != ""}
    for name, opts in (_get(spec, "metrics") or {}).items():
        if isinstance(opts, dict):
            for k, v in opts.items():
                if k not in _NOT_PROTOCOL_OPTIONS and v is not None:
                    out[f"metrics.{name}.{k}"] = _scalar(v)
    for name, m in (entry.get("metrics") or {}).items():
        extra = m.get("extra") if isinstance(m, dict) else None
        for k, v in (extra or {}).items():
            if k in _EXTRA_KEYS or "version" in k or k.startswith("evaluation"):
                _flat(f"{name}.{k}", v, out)
    if isinstance(entry.get("protocol"), dict):
        _flat("protocol", entry["protocol"], out)
    return out


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, a's value, b's value) for every field recorded on either side that differs."""
    keys = list(a) + [k for k in b if k not in a]
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def describe(diffs: list[tuple[str, Any, Any]], left: str = "base", right: str = "new") -> str:
    def show(v: Any) -> str:
        return "(not recorded)" if v is None else str(v)

    return "; ".join(f"{k}: {left} {show(x)}, {right} {show(y)}" for k, x, y in diffs)
