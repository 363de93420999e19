"""The one image opener of the harness, and the data-root confinement of paths.

`open_image` is what the engine (sample inputs), scoring (generated and reference images), the
edit scorer and the reports use to read an image file: a full decode (a truncated file fails
here, not later inside a metric), a pixel-count guard against decompression bombs, the mode
asked for, and one-line errors (`ImageError`, a DataError and so a ValueError: per-sample
failures stay per-sample).

`confined(root, rel)` resolves symlinks before deciding whether a path is inside the data root,
so a link inside the root that points outside it is refused like a `..` path would be (an
outside file was read, thumbnailed and embedded in report.html).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DataError

if TYPE_CHECKING:
    from PIL import Image

# PIL's own bomb threshold is 89.5 M pixels (a warning) and twice that (an error); an image input
# of a multimodal model is at most a few megapixels, so refuse well before decoding costs gigabytes.
MAX_PIXELS = 64_000_000


class ImageError(DataError):
    """An image is missing, unreadable, too large or outside the data root; one-line message."""


def confined(root: str | os.PathLike, rel: str | os.PathLike) -> Path:
    """`root/rel` with symlinks resolved; ImageError when the result is not inside the resolved root."""
    base = Path(root).expanduser().resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise ImageError(f"{rel} resolves to {path}, outside the data root {base} (a symlink or '..' out of it)")
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def open_image(path: str | os.PathLike, *, root: str | os.PathLike | None = None, mode: str | None = "RGB",
               max_side: int | None = None, max_pixels: int = MAX_PIXELS) -> "Image.Image":
    """A fully decoded image.

    path: a file, or a path relative to `root` (then confined to it, symlinks resolved).
    mode: the PIL mode to convert to ("RGB", "RGBA", "L"), or None to keep the decoded one.
    max_side: decode at a reduced size where the format allows (JPEG draft) and shrink to fit
    max_side x max_side (thumbnails for reports); None keeps the full size.
    Errors name the path as given: `missing image val2014/x.jpg`."""
    from PIL import Image  # deferred: `cm3eval --help` must not pay for PIL

    name = str(path)
    file = confined(root, path) if root is not None else Path(path).expanduser()
    try:
        with Image.open(file) as im:
            if im.width * im.height > max_pixels:
                raise ImageError(f"image {name} is {im.width}x{im.height}, over the {max_pixels:,}-pixel limit")
            if max_side is not None:
                im.draft(mode or im.mode, (max_side, max_side))
            im.load()
            out = im.convert(mode) if mode is not None and im.mode != mode else im.copy()
    except FileNotFoundError:
        raise ImageError(f"missing image {name}") from None
    except IsADirectoryError:
        raise ImageError(f"image {name} is a folder") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"corrupt or unreadable image {name}: {_first_line(e)}") from None
    if max_side is not None and max(out.size) > max_side:
        out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return out
