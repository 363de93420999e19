"""The data-side error of tasks/: a data root, an annotation file or an image that is missing,
malformed or outside the root. One-line messages; the CLI prints them and exits 2."""

from __future__ import annotations

from cm3leon.errors import Cm3evalError


class DataError(Cm3evalError, ValueError):
    """The data root or an annotation file is missing or malformed; one-line message.

    A ValueError too, so code that treats a bad input as a per-sample failure (`except
    ValueError`) keeps doing so."""
