"""The one error base of the package family.

Every error that the command line should show as a one-line message (bad settings, a
missing file, a wrong checkpoint, a failed metric) derives from `Cm3evalError`; the CLI
catches it once, prints `str(err)` and exits with `err.exit_code`. It lives in the model
library because the library's own errors (checkpoints, sampling) must share the base and
`cm3leon` imports nothing of the harness.
"""

from __future__ import annotations


class Cm3evalError(Exception):
    """A failure with a one-line, user-facing message."""

    exit_code: int = 2  # usage or missing input; subclasses override (3: a metric could not be computed)
