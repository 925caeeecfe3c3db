"""Jobs and commands: names, versions, immutability and the JSON wire form."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pydantic
import pytest

import jobflow
from jobflow import JobRegistry


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(pydantic.BaseModel):
    street: str
    zip_code: str


class TestNaming:
    def test_explicit_name_and_version(self, registry: JobRegistry) -> None:
        """name= and version= become job_name and job_version."""

        class LogMessageJob(jobflow.Job, name="LogMessage", version=3, registry=registry):
            message: str

            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        assert (LogMessageJob.job_name, LogMessageJob.job_version) == ("LogMessage", 3)
        assert registry.get("LogMessage", 3) is LogMessageJob

    def test_defaults_are_class_name_and_version_one(self, registry: JobRegistry) -> None:
        """Without name and version a job is registered as its class name, version 1."""

        class CleanUpJob(jobflow.Job, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        assert (CleanUpJob.job_name, CleanUpJob.job_version) == ("CleanUpJob", 1)
        assert registry.get("CleanUpJob", 1) is CleanUpJob

    def test_command_naming(self, registry: JobRegistry) -> None:
        """Commands are named and versioned the same way."""

        class SendEmailCommand(jobflow.Command, name="SendEmail", version=2, registry=registry):
            to: str

        class Ping(jobflow.Command, registry=registry):
            pass

        assert (SendEmailCommand.command_name, SendEmailCommand.command_version) == ("SendEmail", 2)
        assert registry.get_command("Ping", 1) is Ping

    @pytest.mark.parametrize("version", [0, -1, "1", True, 1.0])
    def test_bad_version_is_refused(self, registry: JobRegistry, version: object) -> None:
        """A version that is not a positive int is a clear error at definition time."""
        with pytest.raises(jobflow.ConfigurationError, match="version must be an int >= 1"):

            class BadJob(jobflow.Job, version=version, registry=registry):
                def execute(self, ctx: jobflow.JobContext) -> None:
                    pass

    def test_empty_name_is_refused(self, registry: JobRegistry) -> None:
        """An empty name is a clear error at definition time."""
        with pytest.raises(jobflow.ConfigurationError, match="name must be a non-empty string"):

            class BadJob(jobflow.Job, name=" ", registry=registry):
                def execute(self, ctx: jobflow.JobContext) -> None:
                    pass

    def test_abstract_base_is_not_registered(self, registry: JobRegistry) -> None:
        """abstract=True lets applications share a base class without registering it."""

        class Base(jobflow.Job, abstract=True, registry=registry):
            tenant: str

        class Concrete(Base, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        assert registry.job_versions("Base") == []
        assert registry.get("Concrete", 1) is Concrete


class TestModel:
    def test_jobs_are_frozen(self, registry: JobRegistry) -> None:
        """A job cannot change after it was created."""

        class Frozen(jobflow.Job, registry=registry):
            n: int

            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        job = Frozen(n=1)
        with pytest.raises(pydantic.ValidationError):
            job.n = 2  # type: ignore[misc]

    def test_unknown_fields_are_rejected(self, registry: JobRegistry) -> None:
        """Data with fields the type does not have fails validation."""

        class Strict(jobflow.Job, registry=registry):
            n: int

            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        with pytest.raises(pydantic.ValidationError):
            Strict.from_data({"n": 1, "extra": 2})

    def test_round_trip_is_exact(self, registry: JobRegistry) -> None:
        """Datetimes with their zone, UUIDs, Decimals, enums and nested models survive JSON exactly."""

        class Rich(jobflow.Job, registry=registry):
            at: datetime
            local: datetime
            ident: uuid.UUID
            amount: Decimal
            colour: Colour
            address: Address
            tags: list[str]
            wait: timedelta

            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        job = Rich(
            at=datetime(2026, 11, 29, 10, 0, 0, 123456, tzinfo=UTC),
            local=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=5, minutes=30))),
            ident=uuid.uuid4(),
            amount=Decimal("12.3400"),
            colour=Colour.BLUE,
            address=Address(street="Main St 1", zip_code="01234"),
            tags=["a", "b"],
            wait=timedelta(days=1, microseconds=7),
        )
        back = Rich.from_data(job.to_data())
        assert back == job
        assert back.local.utcoffset() == timedelta(hours=5, minutes=30)
        assert str(back.amount) == "12.3400"
        assert back.colour is Colour.BLUE

    def test_strict_models_accept_their_own_json(self, registry: JobRegistry) -> None:
        """Wire data is validated in JSON mode, so strict types still load what they wrote."""

        class StrictJob(jobflow.Job, registry=registry):
            model_config = pydantic.ConfigDict(strict=True)
            ident: uuid.UUID
            amount: Decimal

            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        job = StrictJob(ident=uuid.uuid4(), amount=Decimal("1.5"))
        assert StrictJob.from_data(job.to_data()) == job

    def test_execute_must_be_defined(self, registry: JobRegistry) -> None:
        """A concrete job without execute is refused when its class is defined, not retried later."""
        with pytest.raises(jobflow.ConfigurationError, match="defines no execute"):

            class Lazy(jobflow.Job, registry=registry):
                pass

        assert registry.job_versions("Lazy") == []

    def test_abstract_job_needs_no_execute(self, registry: JobRegistry) -> None:
        """A shared base class (abstract=True) may leave execute to its subclasses."""

        class Base(jobflow.Job, abstract=True, registry=registry):
            pass

        class Concrete(Base, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        assert registry.get("Concrete", 1) is Concrete
