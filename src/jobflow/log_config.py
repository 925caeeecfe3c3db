"""structlog set-up for workers and the command line: readable on a terminal, JSON otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog
from structlog.typing import Processor

LogFormat = Literal["auto", "console", "json"]


def configure_logging(
    format: LogFormat = "auto", level: str = "INFO", stream: TextIO | None = None, *, tracebacks: bool = True
) -> None:
    """Configure structlog once per process; library code only ever calls ``structlog.get_logger``.

    ``tracebacks=False`` keeps the error type and message but drops tracebacks (the demo's output).
    """
    stream = stream or sys.stderr
    console = format == "console" or (format == "auto" and stream.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not tracebacks:
        shared.append(_drop_exc_info)
    renderer: list[Processor] = (
        [structlog.dev.ConsoleRenderer()]
        if console
        else [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    )
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def _drop_exc_info(logger: object, method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    event.pop("exc_info", None)
    return event
