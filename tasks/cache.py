"""The one cache location of the package family: `$CM3EVAL_CACHE`, else `$XDG_CACHE_HOME/cm3eval`,
else `~/.cache/cm3eval`.

Everything that is derived and re-derivable (the demo world's rendered images, FID reference
statistics, file-hash caches) lives under it, each in its own sub-folder, so one variable moves
or clears all of it. Evals and reports call `cache_dir("fid-stats")` instead of reading
environment variables of their own.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "CM3EVAL_CACHE"


def cache_dir(*parts: str) -> Path:
    """The cache root (or a sub-folder of it); not created here, callers create what they write."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        base = Path(explicit).expanduser()
    else:
        # XDG says an unset or empty XDG_CACHE_HOME means ~/.cache
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "cm3eval"
    return base.joinpath(*parts)
