"""The error a metric raises when it cannot be computed here (exit code 3 when it was requested)."""

from __future__ import annotations

from cm3leon.errors import Cm3evalError


class MetricUnavailable(Cm3evalError, RuntimeError):
    """The metric cannot run here (missing weights or inputs); reported as a note, not a number."""

    exit_code = 3  # a requested metric could not be computed
