"""The published evaluation protocols, as the papers report them (a leaf module: the spec schema
validates `protocol.name` against it, tasks/protocols.py builds manifests for it)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DataError


@dataclass(frozen=True)
class Published:
    """A protocol as the paper reports it."""

    name: str
    n: int
    split: str
    resolution: int
    resize: str
    candidates: int
    k: int
    source: str


PUBLISHED: dict[str, Published] = {
    "coco-fid-30k": Published("coco-fid-30k", n=30_000, split="val2014", resolution=256, resize="pytorch-fid",
                              candidates=8, k=2, source="CM3leon (Yu et al. 2023), Table 1"),
}


def published(name: str) -> Published:
    try:
        return PUBLISHED[name]
    except KeyError:
        raise DataError(f"protocol.name {name!r}: unknown protocol (known: {', '.join(PUBLISHED)})") from None
