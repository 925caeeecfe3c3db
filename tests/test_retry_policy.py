"""Retry policies, class options and the errors a job raises to steer them."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from dramatiq.errors import Retry
from dramatiq.middleware import TimeLimitExceeded

import jobflow
from jobflow import JobRegistry, RetryPolicy
from jobflow.envelope import MAX_DELAY
from jobflow.retry import DEFAULT_RETRY_POLICY, DEFAULT_TIME_LIMIT, MAX_RETRY_DELAY, requested_delay


class TestRetryPolicy:
    def test_defaults(self) -> None:
        """The default: 10 attempts, 15 s first backoff doubling to a 1 h cap, equal jitter."""
        policy = RetryPolicy()
        assert (policy.max_attempts, policy.backoff, policy.max_backoff) == (
            10,
            timedelta(seconds=15),
            timedelta(hours=1),
        )
        assert (policy.multiplier, policy.jitter) == (2.0, 0.5)
        assert policy == DEFAULT_RETRY_POLICY
        assert timedelta(minutes=10) == DEFAULT_TIME_LIMIT

    def test_backoff_is_exponential_and_capped(self) -> None:
        """Without jitter, each retry waits twice the one before, never more than the cap."""
        policy = RetryPolicy(jitter=0)
        delays = [policy.delay(n).total_seconds() for n in range(1, 10)]
        assert delays == [15, 30, 60, 120, 240, 480, 960, 1920, 3600]

    def test_default_schedule_spans_about_two_hours(self) -> None:
        """Nine retries without jitter take a little over two hours: the documented default."""
        policy = RetryPolicy(jitter=0)
        total = sum((policy.delay(n) for n in range(1, policy.max_attempts)), timedelta())
        assert timedelta(hours=2) < total < timedelta(hours=2, minutes=10)

    def test_jitter_stays_between_half_and_all_of_the_step(self) -> None:
        """Equal jitter draws each delay between (1 - jitter) of its step and the step itself."""
        policy = RetryPolicy()
        rng = random.Random(7)
        delays = [policy.delay(3, rng=rng).total_seconds() for _ in range(500)]
        assert min(delays) >= 30
        assert max(delays) <= 60
        assert max(delays) - min(delays) > 20  # it does vary

    def test_cap_bounds_jittered_delays(self) -> None:
        """A delay never exceeds max_backoff, however many retries came before."""
        policy = RetryPolicy(max_attempts=100, max_backoff=timedelta(seconds=5))
        assert max(policy.delay(n) for n in range(1, 100)) <= timedelta(seconds=5)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"max_attempts": 0},
            {"max_attempts": True},
            {"backoff": 15},
            {"max_backoff": timedelta(seconds=-1)},
            {"max_backoff": MAX_RETRY_DELAY + timedelta(days=1)},
            {"multiplier": 0.5},
            {"jitter": 1.5},
            {"transient": ValueError},
            {"permanent": ("KeyError",)},
        ],
    )
    def test_rejects_unusable_settings(self, kwargs: dict[str, object]) -> None:
        """A policy that cannot work is a ConfigurationError when it is made."""
        with pytest.raises(jobflow.ConfigurationError):
            RetryPolicy(**kwargs)  # type: ignore[arg-type]

    def test_max_retry_delay_matches_the_schedulers(self) -> None:
        """A job can ask for a retry as far ahead as a scheduler can delay a job."""
        assert MAX_RETRY_DELAY == MAX_DELAY


class TestVerdict:
    def test_permanent_error_is_never_retried(self) -> None:
        """PermanentError is permanent even when the policy lists it as transient."""
        assert RetryPolicy(transient=(jobflow.PermanentError,)).verdict(jobflow.PermanentError("no")) == "permanent"

    def test_transient_error_is_always_retried(self) -> None:
        """TransientError is transient even when the policy lists no transient exception."""
        policy = RetryPolicy(transient=(), permanent=(jobflow.TransientError,))
        assert policy.verdict(jobflow.TransientError("later")) == "transient"

    def test_other_exceptions_are_transient_by_default(self) -> None:
        """Any other exception is retried unless the policy says otherwise."""
        assert RetryPolicy().verdict(ValueError("x")) == "transient"

    def test_policy_lists_decide(self) -> None:
        """permanent= wins over transient=; an exception matching neither is permanent."""
        policy = RetryPolicy(transient=(OSError,), permanent=(FileNotFoundError,))
        assert policy.verdict(ConnectionError()) == "transient"
        assert policy.verdict(FileNotFoundError()) == "permanent"
        assert policy.verdict(ValueError()) == "permanent"

    @pytest.mark.parametrize(
        "exc", [jobflow.UnknownJobError("x"), jobflow.UnknownCommandError("x"), jobflow.InvalidPayloadError("x")]
    )
    def test_poison_is_permanent(self, exc: Exception) -> None:
        """Unknown types and rejected data never succeed later: they are permanent."""
        assert RetryPolicy().verdict(exc) == "permanent"

    def test_time_limit_and_dramatiq_retry_are_transient(self) -> None:
        """A time limit and Dramatiq's Retry are transient whatever the policy lists."""
        policy = RetryPolicy(transient=())
        assert policy.verdict(TimeLimitExceeded()) == "transient"
        assert policy.verdict(Retry(delay=5)) == "transient"


class TestRetryAfter:
    def test_transient_error_carries_its_delay(self) -> None:
        """TransientError(retry_after=...) replaces the backoff, up to the longest delay."""
        assert requested_delay(jobflow.TransientError("x", retry_after=timedelta(seconds=3))) == timedelta(seconds=3)
        assert requested_delay(jobflow.TransientError("x", retry_after=timedelta(days=10_000))) == MAX_RETRY_DELAY
        assert requested_delay(jobflow.TransientError("x")) is None
        assert requested_delay(Retry(delay=250)) == timedelta(milliseconds=250)
        assert requested_delay(ValueError()) is None

    def test_negative_retry_after_is_refused(self) -> None:
        """A negative or non-timedelta retry_after is a ConfigurationError."""
        with pytest.raises(jobflow.ConfigurationError):
            jobflow.TransientError("x", retry_after=timedelta(seconds=-1))
        with pytest.raises(jobflow.ConfigurationError):
            jobflow.TransientError("x", retry_after=5)  # type: ignore[arg-type]


class TestClassOptions:
    def test_job_and_command_options(self, registry: JobRegistry) -> None:
        """retry= and time_limit= on a job or command class are what the registry hands out for it."""
        policy = RetryPolicy(max_attempts=3)

        class Slow(jobflow.Job, registry=registry, retry=policy, time_limit=timedelta(minutes=30)):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        class Ping(jobflow.Command, registry=registry, retry=RetryPolicy(max_attempts=2)):
            pass

        assert registry.options_for("job", "Slow", 1) == (policy, timedelta(minutes=30))
        assert registry.options_for("command", "Ping", 1).retry.max_attempts == 2
        assert registry.options_for("command", "Ping", 1).time_limit == DEFAULT_TIME_LIMIT

    def test_subclasses_inherit_options(self, registry: JobRegistry) -> None:
        """A subclass of an abstract base with options has the same options."""
        policy = RetryPolicy(max_attempts=4)

        class Base(jobflow.Job, registry=registry, abstract=True, retry=policy, time_limit=timedelta(seconds=5)):
            pass

        class Child(Base, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        assert registry.options_for("job", "Child", 1) == (policy, timedelta(seconds=5))

    def test_registry_defaults_apply_to_unknown_and_plain_types(self) -> None:
        """Types without options, and types the registry does not know, get the registry's defaults."""
        policy = RetryPolicy(max_attempts=2)
        registry = JobRegistry(retry_policy=policy, time_limit=timedelta(seconds=9))

        class Plain(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        assert registry.options_for("job", "Plain", 1) == (policy, timedelta(seconds=9))
        assert registry.options_for("job", "Nobody", 7) == (policy, timedelta(seconds=9))
        assert JobRegistry().options_for("job", "Nobody", 1) == (DEFAULT_RETRY_POLICY, DEFAULT_TIME_LIMIT)

    @pytest.mark.parametrize(
        "options",
        [{"retry": 5}, {"time_limit": 60}, {"time_limit": timedelta(0)}],
    )
    def test_bad_options_are_refused(self, registry: JobRegistry, options: dict[str, object]) -> None:
        """A retry that is not a RetryPolicy, or a time limit that is not a positive timedelta, is refused."""
        with pytest.raises(jobflow.ConfigurationError):

            class Bad(jobflow.Job, registry=registry, **options):
                def execute(self, ctx: jobflow.JobContext) -> None:
                    pass


class TestBackoffOverflow:
    def test_thousands_of_attempts_stay_at_the_cap(self) -> None:
        """A retry count whose exponential step overflows a float waits the cap, it does not crash."""
        policy = jobflow.RetryPolicy(max_attempts=5000, jitter=0.0)
        assert policy.delay(3000) == policy.max_backoff
