"""Images from a run folder as data URIs for the self-contained report.

Paths must resolve (symlinks included) inside the run folder: a sample file cannot pull /etc or
a neighbour's files into a report. Every image is decoded and re-encoded as PNG, so what is
embedded is an image of bounded size, whatever the file held.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from tasks.images import ImageError, open_image

DEFAULT_IMAGE_MAX_SIDE = 256  # px; larger images are downscaled before embedding
MIN_DISPLAY_SIDE = 128  # tiny demo images are enlarged (nearest) so they are visible
MAX_PIXELS = 64_000_000  # larger files are listed as unreadable, not decoded


@dataclass
class Figure:
    """One image cell of a grid: a data URI, or why there is none."""
    caption: str
    name: str  # the path as the sample line gave it
    uri: str | None = None
    problem: str = ""  # "missing image" | "unreadable image"
    winner: bool = False
    reference: bool = False  # a ground-truth image shown beside generated ones
    arrow_before: bool = False  # input → output: an arrow precedes this cell
    bar_before: bool = False  # output | target: a bar separates the ground truth


class ImageEmbedder:
    def __init__(self, run_dir: Path, max_side: int = DEFAULT_IMAGE_MAX_SIDE) -> None:
        self.root = Path(run_dir).resolve()
        self.max_side = max_side
        self._cache: dict[Path, str | None] = {}

    def resolve(self, rel: Any, base: Path) -> Path | None:
        if not isinstance(rel, str) or not rel:
            return None
        for folder in (base, self.root):
            p = (folder / rel).resolve()
            if p.is_relative_to(self.root) and p.is_file():
                return p
        return None

    def data_uri(self, path: Path) -> str | None:
        if path not in self._cache:
            self._cache[path] = self._encode(path)
        return self._cache[path]

    def _encode(self, path: Path) -> str | None:
        try:  # the one opener: pixel limit, JPEG draft decoding at reduced size, thumbnail
            im = open_image(path, mode=None, max_side=self.max_side, max_pixels=MAX_PIXELS)
        except ImageError:
            return None
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        side = max(im.size)
        if side < MIN_DISPLAY_SIDE:
            f = -(-MIN_DISPLAY_SIDE // side)
            im = im.resize((im.width * f, im.height * f), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def figure(self, rel: Any, base: Path, caption: str = "", winner: bool = False) -> Figure:
        path = self.resolve(rel, base)
        uri = self.data_uri(path) if path else None
        problem = "" if uri else ("unreadable image" if path else "missing image")
        return Figure(caption, "" if rel is None else str(rel), uri, problem, winner)
