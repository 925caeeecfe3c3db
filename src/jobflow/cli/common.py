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
from dramatiq.errors import BrokerConnectionError
from pydantic import ValidationError

from jobflow.broker import create_broker, redact_url
from jobflow.broker.connection import split_urls
from jobflow.cli import amqp
from jobflow.cli.amqp import Connection
from jobflow.cli.errors import EXIT_BROKER, EXIT_INCOMPLETE, EXIT_USAGE, OperatorError, UsageProblem
from jobflow.errors import BrokerUnavailableError, ConfigurationError, JobflowError, RegistrationError, SchedulingError
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
    """``--broker``, ``--prefix`` and ``-m MODULE``."""
    return target_options(module_option(f))


def target_options(f: Callable[P, R]) -> Callable[P, R]:
    """``--broker`` and ``--prefix``: where a command acts."""
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
    """Turn jobflow's errors into a one-line message and the documented exit code, never a traceback.

    Broker failures exit 4, bad input 2; a failure no command caught (a pika or Dramatiq error
    raised somewhere unforeseen) still becomes a broker error, on the broker the command named.
    """

    @functools.wraps(f)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        _quiet_libraries()
        try:
            return f(*args, **kwargs)
        except OperatorError as exc:
            raise CommandFailed(_one_line(exc), exc.exit_code) from None
        except (BrokerUnavailableError, BrokerConnectionError) as exc:
            raise CommandFailed(_one_line(exc), EXIT_BROKER) from None
        except (ConfigurationError, SchedulingError, RegistrationError) as exc:
            raise CommandFailed(_one_line(exc), EXIT_USAGE) from None
        except amqp.BROKER_FAILURES as exc:
            context = click.get_current_context(silent=True)
            url = context.meta.get(_BROKER_KEY) if context is not None else None
            if url is None:
                raise
            raise CommandFailed(_one_line(amqp.broker_error(url, exc, doing="keep talking to")), EXIT_BROKER) from None
        except JobflowError as exc:
            raise CommandFailed(_one_line(exc), EXIT_INCOMPLETE) from None

    return wrapper


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


#: Where :func:`target` leaves the broker's URL for :func:`reports_errors` (``click.Context.meta``).
_BROKER_KEY = "jobflow.broker_url"


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

    def announce(self, source: str) -> None:
        """Name the broker on stderr before talking to it: an operator sees which one, and why."""
        click.echo(f"broker: {amqp.describe(self.url)}, queue prefix {self.prefix!r} ({source})", err=True)

    @contextmanager
    def connection(self, purpose: str) -> Iterator[Connection]:
        with amqp.connection(self.url, purpose) as conn:
            yield conn

    @contextmanager
    def broker(self, purpose: str) -> Iterator[dramatiq.Broker]:
        """jobflow's broker (publisher confirms on), with the command line's short timeouts."""
        nodes = ",".join(amqp.cli_url(node, purpose) for node in split_urls(self.url))
        settings = self.settings.model_copy(update={"broker_url": nodes})
        broker = create_broker(settings)
        try:
            yield broker
        finally:
            broker.close()


def settings_from(broker_url: str | None, prefix: str | None, **more: Any) -> Settings:
    """Settings from the options, else ``JOBFLOW_*``; one that cannot work is a usage problem."""
    given: dict[str, Any] = {k: v for k, v in more.items() if v is not None}
    if broker_url is not None:
        given["broker_url"] = broker_url
    if prefix is not None:
        given["queue_prefix"] = prefix
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_OPTION_NAMES.get(str(e['loc'][0]), '.'.join(map(str, e['loc'])))}: {e['msg']}" for e in exc.errors()
        )
        raise UsageProblem(f"invalid settings: {problems}") from None


#: How the settings an option sets are called on the command line, for error messages.
_OPTION_NAMES = {"queue_prefix": "--prefix (JOBFLOW_QUEUE_PREFIX)", "broker_url": "--broker (JOBFLOW_BROKER_URL)"}


def url_source(broker_url: str | None) -> str:
    """Where the broker URL came from: an operator who forgot ``--broker`` must see the default was used."""
    if broker_url is not None:
        return "from --broker"
    if os.environ.get("JOBFLOW_BROKER_URL"):
        return "from JOBFLOW_BROKER_URL"
    return "the default: neither --broker nor JOBFLOW_BROKER_URL is set"


def rabbitmq_target(settings: Settings, broker_url: str | None) -> Target:
    """A :class:`Target` on RabbitMQ, its URL checked and announced on stderr before any connection."""
    if {urlsplit(u).scheme for u in split_urls(settings.broker_url)} - {"amqp", "amqps"}:
        raise UsageProblem(
            f"this command needs RabbitMQ (amqp:// or amqps://), not {redact_url(settings.broker_url)!r}"
        )
    amqp.cli_parameters(settings.broker_url, "check")  # a URL pika cannot read is a usage problem, now
    where = Target(settings)
    context = click.get_current_context(silent=True)
    if context is not None:
        context.meta[_BROKER_KEY] = settings.broker_url
    where.announce(url_source(broker_url))
    return where


def target(broker_url: str | None, prefix: str | None, modules: tuple[str, ...]) -> Target:
    """Settings from the options, else ``JOBFLOW_*``; the operators' commands need RabbitMQ."""
    import_modules(modules)
    return rabbitmq_target(settings_from(broker_url, prefix), broker_url)
