"""structlog set-up for workers and the command line: one stream, readable on a terminal, JSON otherwise.

What is logged by default is safe to ship to a log store: tracebacks carry no local variables
(they held job data, ``ctx.services`` and its credentials), job and command data appear in no
event, and Dramatiq's records that name a message show its actor and id instead of its arguments
(``JOBFLOW_LOG_JOB_DATA=1`` shows the data, for development only).

:func:`configure_logging` puts one handler on the root logger: Dramatiq's and pika's stdlib records
are rendered by structlog's :class:`~structlog.stdlib.ProcessorFormatter`, and structlog's own
events skip the stdlib machinery (it would cost a LogRecord per event) but are written through the
same handler, whole lines per write under the handler's lock. In a ``dramatiq`` worker process
every write is one message on the pipe to its supervisor, so lines never interleave.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Literal, TextIO, cast

import structlog
from dramatiq.broker import MessageProxy
from dramatiq.message import Message
from structlog.typing import EventDict, FilteringBoundLogger, Processor

from jobflow.broker.names import DISPATCH_COMMAND_ACTOR, RUN_JOB_ACTOR

LogFormat = Literal["auto", "console", "json"]

#: Environment variable that lets events (and Dramatiq's records) show job and command data.
JOB_DATA_ENV = "JOBFLOW_LOG_JOB_DATA"

#: Dramatiq's (2.2.1) record of a failed message; jobflow logs its own ``job.failed`` instead.
DRAMATIQ_FAILURE = "Failed to process message %s with unhandled exception."

#: The Dramatiq logger of worker threads, where the records naming a message being processed come from.
DRAMATIQ_WORKER_THREAD = "dramatiq.worker.WorkerThread"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class _State:
    job_data = _env_flag(JOB_DATA_ENV)


def job_data_shown() -> bool:
    """Whether events may carry job and command data (``JOBFLOW_LOG_JOB_DATA``; off by default)."""
    return _State.job_data


def configure_logging(
    format: LogFormat = "auto",
    level: str = "INFO",
    stream: TextIO | None = None,
    *,
    tracebacks: bool = True,
    job_data: bool | None = None,
) -> None:
    """Configure structlog and the root logger once per process; library code only calls ``get_logger``.

    ``tracebacks=False`` keeps the error type and message but drops tracebacks (the demo's output).
    ``job_data`` (default: ``JOBFLOW_LOG_JOB_DATA``) lets events show job and command data.
    Replaces the root's plain stream handlers (Dramatiq's ``basicConfig``, an earlier call's);
    file and capture handlers stay.
    """
    stream = stream or sys.stderr
    if job_data is not None:
        _State.job_data = job_data
    console = format == "console" or (format == "auto" and stream.isatty())
    numeric_level = logging.getLevelName(level)
    tail = _renderers(console, colors=console and stream.isatty())
    handler = _LineHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *_shared(tracebacks)],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    handler.addFilter(MESSAGE_FILTER)
    root = logging.getLogger()
    for old in list(root.handlers):
        if type(old) is logging.StreamHandler or isinstance(old, _LineHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    hide_message_data()
    line_logger = _LineLogger(handler.write_line)
    structlog.configure(
        processors=[*_shared(tracebacks), *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=lambda *args: line_logger,
        cache_logger_on_first_use=False,
    )


def reset_logging() -> None:
    """Undo :func:`configure_logging` (for tests): structlog's defaults, and no jobflow root handler."""
    structlog.reset_defaults()
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _LineHandler):
            root.removeHandler(old)
    root.setLevel(logging.WARNING)
    _State.job_data = _env_flag(JOB_DATA_ENV)


def _shared(tracebacks: bool) -> list[Processor]:
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not tracebacks:
        shared.append(_drop_exc_info)
    return shared


def _renderers(console: bool, *, colors: bool) -> list[Processor]:
    """The final processors: tracebacks without local variables, in either format."""
    if console:
        return [structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=structlog.dev.plain_traceback)]
    return [
        structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
        structlog.processors.JSONRenderer(),
    ]


def _drop_exc_info(logger: object, method: str, event: EventDict) -> EventDict:
    event.pop("exc_info", None)
    return event


class _LineHandler(logging.StreamHandler[TextIO]):
    """The root handler: each record in one write and flush under its lock; structlog's lines
    group-committed: whole lines, in order, in as few writes as the threads' pace allows.

    Why: a worker logs two lines per job from up to eight threads, and in a ``dramatiq`` process
    each write is one message on the pipe that the supervisor reads, decodes and flushes again. One
    thread at a time writes everything pending; the others append their line and go on (the writing
    thread writes it before it returns). A lone line is written at once.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._pending_lock = threading.Lock()
        self._writing = False

    def write_line(self, line: str) -> None:
        with self._pending_lock:
            self._pending.append(line)
            if self._writing:
                return
            self._writing = True
        while True:
            with self._pending_lock:
                if not self._pending:
                    self._writing = False
                    return
                batch, self._pending = self._pending, []
            self.acquire()
            try:
                self.stream.write("\n".join(batch) + "\n")
                self.stream.flush()
            except BaseException:
                with self._pending_lock:
                    self._writing = False
                raise
            finally:
                self.release()


class _LineLogger:
    """structlog's final logger: hands each rendered line to one writer (structlog calls it by level name)."""

    __slots__ = ("_write",)

    def __init__(self, write: Any) -> None:
        self._write = write

    def msg(self, message: str) -> None:
        self._write(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _is_message(value: object) -> bool:
    return isinstance(value, Message | MessageProxy)


def describe_message(message: Any) -> str:
    """A message without its arguments: its actor, its jobflow type if it has one, and its id."""
    args = getattr(message, "args", ())
    envelope = args[0] if isinstance(args, tuple | list) and len(args) == 1 else None
    if isinstance(envelope, dict) and isinstance(envelope.get("name"), str):
        return f"{message.actor_name}({envelope['name']} v{envelope.get('version')}, id={message.message_id})"
    return f"{message.actor_name}(id={message.message_id})"


class MessageDataFilter(logging.Filter):
    """Dramatiq's records name a message by its arguments (job data): here by actor and id instead.

    Dramatiq's record of a failed jobflow job or command is dropped: jobflow logged its own
    ``job.failed`` / ``command.failed`` for it, with the traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not record.name.startswith("dramatiq") or not isinstance(args, tuple) or not args:
            return True
        if record.msg == DRAMATIQ_FAILURE and _is_jobflow_message(args[0]):
            return False
        if not _State.job_data and any(_is_message(arg) for arg in args):
            record.args = tuple(describe_message(arg) if _is_message(arg) else arg for arg in args)
        return True


def _is_jobflow_message(value: object) -> bool:
    return _is_message(value) and getattr(value, "actor_name", None) in (RUN_JOB_ACTOR, DISPATCH_COMMAND_ACTOR)


MESSAGE_FILTER = MessageDataFilter()


def hide_message_data() -> None:
    """Put the filter on Dramatiq's worker-thread logger, whatever handlers the application configured."""
    thread_logger = logging.getLogger(DRAMATIQ_WORKER_THREAD)
    if MESSAGE_FILTER not in thread_logger.filters:
        thread_logger.addFilter(MESSAGE_FILTER)


class _Fallback:
    """Where jobflow logs while the application configured no structlog: stderr, readable, never stdout."""

    lock = threading.Lock()
    logger: FilteringBoundLogger | None = None

    @classmethod
    def get(cls) -> FilteringBoundLogger:
        if cls.logger is None:
            console = structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
            )
            cls.logger = cast(
                FilteringBoundLogger,
                structlog.wrap_logger(
                    _LineLogger(cls.write),
                    processors=[*_shared(True), console],
                    wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
                ),
            )
        return cls.logger

    @classmethod
    def write(cls, line: str) -> None:
        with cls.lock:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()


class _JobflowLogger:
    """``structlog.get_logger("jobflow")`` once structlog is configured, else :class:`_Fallback`.

    Decided at each call, so an application may configure structlog after importing jobflow.
    """

    __slots__ = ()
    _configured: Any = structlog.get_logger("jobflow")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._configured if structlog.is_configured() else _Fallback.get(), name)


def get_logger() -> FilteringBoundLogger:
    """jobflow's logger: the application's structlog set-up, or stderr when it configured none."""
    return cast(FilteringBoundLogger, _JobflowLogger())
