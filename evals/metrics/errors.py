"""The errors of metrics: one that cannot be computed here (exit 3 when it was requested), and a
requested metric whose inputs are known missing before any model loads (exit 2: fix the command)."""

from __future__ import annotations

from cm3leon.errors import Cm3evalError


class MetricUnavailable(Cm3evalError, RuntimeError):
    """The metric cannot run here (missing weights or inputs); reported as a note, not a number."""

    exit_code = 3  # a requested metric could not be computed


class MetricInputMissing(Cm3evalError, ValueError):
    """A requested metric names no encoder, lacks the data file its texts come from, or asks for a
    back-end this machine lacks: refused by the plan phase, one line naming the option to set."""

    exit_code = 2  # usage or missing input: nothing was generated yet
