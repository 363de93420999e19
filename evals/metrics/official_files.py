"""Readers shared by the scorers of official result files (COCO caption results, VQA results)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: str | Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_results(path: str | Path, id_key: str, value_key: str, *, duplicate: str) -> dict[Any, str]:
    """An official results list [{id_key, value_key: str}] -> {id: value}; one entry per id.

    `duplicate` words the error for a repeated id, e.g. "has more than one caption".
    """
    results = read_json(path)
    if not isinstance(results, list) or not results:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{'{id_key}', '{value_key}'}} objects")
    out: dict[Any, str] = {}
    for n, item in enumerate(results):
        if not isinstance(item, dict) or id_key not in item or not isinstance(item.get(value_key), str):
            raise ValueError(f"{path}: entry {n} lacks an '{id_key}' or a string '{value_key}'")
        if item[id_key] in out:
            raise ValueError(f"{path}: {id_key} {item[id_key]} {duplicate}")
        out[item[id_key]] = item[value_key]
    return out
