"""Jobs of the example application: they live in :mod:`jobflow.examples.jobs`, shipped with jobflow."""

from __future__ import annotations

from jobflow.examples.jobs import FlakyJob, LogMessageJob

__all__ = ["FlakyJob", "LogMessageJob"]
