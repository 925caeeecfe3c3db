"""What every operators' command shares: ``--broker``, ``--prefix``, ``-m``, and exit codes for errors."""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import click
import dramatiq
from pydantic import ValidationError

from jobflow.broker import create_broker, redact_url
from jobflow.cli import amqp
from jobflow.cli.amqp import Connection
from jobflow.cli.errors import EXIT_USAGE, OperatorError, UsageProblem
from jobflow.errors import ConfigurationError, JobflowError, SchedulingError
from jobflow.log_config import configure_logging
from jobflow.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")


def module_option(f: Callable[P, R]) -> Callable[P, R]:
    return click.option(
        "-m",
        "--module",
        "modules",
        multiple=True,
        metavar="MODULE",
        help="Import the application's job and command modules (repeatable), from the current directory too.",
    )(f)


def broker_options(f: Callable[P, R]) -> Callable[P, R]:
    f = module_option(f)
    f = click.option(
        "--prefix", default=None, metavar="PREFIX", help="Queue name prefix [default: JOBFLOW_QUEUE_PREFIX or jobflow]."
    )(f)
    return click.option(
        "--broker",
        "broker_url",
        default=None,
        metavar="URL",
        help="amqp:// or amqps:// URL [default: JOBFLOW_BROKER_URL or amqp://guest:guest@localhost:5672/].",
    )(f)


class CommandFailed(click.ClickException):
    """Ends the command with an operator error's message on stderr and its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # Click reads it from the instance; typed as a class constant


def reports_errors(f: Callable[P, R]) -> Callable[P, R]:
    """Turn jobflow's errors into a one-line message and the documented exit code, never a traceback."""

    @functools.wraps(f)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        _quiet_libraries()
        try:
            return f(*args, **kwargs)
        except OperatorError as exc:
            raise CommandFailed(str(exc), exc.exit_code) from None
        except (ConfigurationError, SchedulingError) as exc:
            raise CommandFailed(str(exc), EXIT_USAGE) from None

    return wrapper


def _quiet_libraries() -> None:
    # pika and Dramatiq log connection trouble with tracebacks; the command reports it once, readably.
    for name in ("pika", "dramatiq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    configure_logging("auto", "WARNING", stream=sys.stderr)


def import_modules(modules: tuple[str, ...]) -> None:
    """Import the application's modules so the registry knows its types (like ``dramatiq --path .``)."""
    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UsageProblem(f"cannot import module {module!r}: {exc}") from None
        except JobflowError as exc:
            raise UsageProblem(f"importing module {module!r} failed: {exc}") from None


@dataclass(frozen=True)
class Target:
    """The broker and queue prefix a command works on."""

    settings: Settings

    @property
    def url(self) -> str:
        return self.settings.broker_url

    @property
    def shown_url(self) -> str:
        return redact_url(self.url)

    @property
    def prefix(self) -> str:
        return self.settings.queue_prefix

    @contextmanager
    def connection(self, purpose: str) -> Iterator[Connection]:
        with amqp.connection(self.url, purpose) as conn:
            yield conn

    @contextmanager
    def broker(self, purpose: str) -> Iterator[dramatiq.Broker]:
        """jobflow's broker (publisher confirms on), with the command line's short timeouts."""
        settings = self.settings.model_copy(update={"broker_url": amqp.cli_url(self.url, purpose)})
        broker = create_broker(settings)
        try:
            yield broker
        finally:
            broker.close()


def target(broker_url: str | None, prefix: str | None, modules: tuple[str, ...]) -> Target:
    """Settings from the options, else ``JOBFLOW_*``; the operators' commands need RabbitMQ."""
    import_modules(modules)
    given: dict[str, Any] = {}
    if broker_url is not None:
        given["broker_url"] = broker_url
    if prefix is not None:
        given["queue_prefix"] = prefix
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UsageProblem(f"invalid settings: {problems}") from None
    if urlsplit(settings.broker_url).scheme not in ("amqp", "amqps"):
        raise UsageProblem(
            f"this command needs RabbitMQ (amqp:// or amqps://), not {redact_url(settings.broker_url)!r}"
        )
    return Target(settings)
