"""The errors of the reports package: one-line messages that name the file or the option."""

from __future__ import annotations

from cm3leon.errors import Cm3evalError


class ReportError(Cm3evalError, ValueError):
    """Bad input to a report (usage or a missing/malformed file): exit code 2."""


class CompareRefused(ReportError):
    """The two runs were not measured under the same protocol (and --force was not given)."""


class InconsistentRun(ReportError):
    """A run whose metrics.json disagrees with its own per-sample scores."""
