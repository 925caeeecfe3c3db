"""The registry: (name, version) to class, handlers, and errors that say what exists."""

from __future__ import annotations

import pytest

import jobflow
from jobflow import JobRegistry


class TestJobs:
    def test_versions_side_by_side(self, registry: JobRegistry) -> None:
        """Several versions of one name are registered at once, each its own class."""

        class V1(jobflow.Job, name="Report", version=1, registry=registry):
            day: str

            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        class V2(jobflow.Job, name="Report", version=2, registry=registry):
            day: str
            region: str

            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        assert registry.get("Report", 1) is V1
        assert registry.get("Report", 2) is V2
        assert registry.job_versions("Report") == [1, 2]

    def test_second_class_for_taken_pair_names_both(self, registry: JobRegistry) -> None:
        """Claiming a taken (name, version) fails at definition time, naming both classes."""

        class First(jobflow.Job, name="Taken", registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        with pytest.raises(jobflow.RegistrationError) as info:

            class Second(jobflow.Job, name="Taken", registry=registry):
                def execute(self, ctx: jobflow.JobContext) -> None:
                    pass

        assert isinstance(info.value, jobflow.JobflowError)
        assert "First" in str(info.value)
        assert "Second" in str(info.value)

    def test_unknown_pair_names_existing_versions(self, registry: JobRegistry) -> None:
        """An unknown (name, version) raises UnknownJobError naming the versions that exist."""

        class Known(jobflow.Job, name="Known", version=2, registry=registry):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        with pytest.raises(jobflow.UnknownJobError, match=r"\('Known', 7\).*registered versions: \[2\]") as info:
            registry.get("Known", 7)
        assert (info.value.name, info.value.version) == ("Known", 7)

    def test_unknown_name(self, registry: JobRegistry) -> None:
        """An unknown name says no version of it is registered."""
        with pytest.raises(jobflow.UnknownJobError, match="no version of 'Nope' is registered"):
            registry.get("Nope", 1)

    def test_default_registry_is_used_by_default(self) -> None:
        """Jobs defined without registry= join jobflow.default_registry."""
        assert jobflow.default_registry.get("PublishCommand", 2) is jobflow.PublishCommandJob

    def test_every_registry_knows_publish_command_job(self, registry: JobRegistry) -> None:
        """PublishCommandJob is built in, in custom registries too."""
        assert registry.get("PublishCommand", 2) is jobflow.PublishCommandJob

    def test_registries_are_separate(self) -> None:
        """Two registries keep the same pair apart (tests, tenants)."""
        a, b = JobRegistry(), JobRegistry()

        class InA(jobflow.Job, name="Same", registry=a):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        class InB(jobflow.Job, name="Same", registry=b):
            def execute(self, ctx: jobflow.JobContext) -> None:
                pass

        assert a.get("Same", 1) is InA
        assert b.get("Same", 1) is InB


class TestCommands:
    def test_handler_is_registered(self, registry: JobRegistry) -> None:
        """@command_handler registers the handler of its command type."""

        class Hello(jobflow.Command, registry=registry):
            who: str

        @jobflow.command_handler(Hello)
        def hello(command: Hello, ctx: jobflow.CommandContext) -> None:
            pass

        assert registry.handler_for("Hello", 1) is hello

    def test_second_handler_is_an_error(self, registry: JobRegistry) -> None:
        """A command type has exactly one handler."""

        class Once(jobflow.Command, registry=registry):
            pass

        @jobflow.command_handler(Once)
        def first(command: Once, ctx: jobflow.CommandContext) -> None:
            pass

        with pytest.raises(jobflow.RegistrationError, match="already has the handler"):

            @jobflow.command_handler(Once)
            def second(command: Once, ctx: jobflow.CommandContext) -> None:
                pass

    def test_unknown_command(self, registry: JobRegistry) -> None:
        """An unknown command raises UnknownCommandError naming the pair."""
        with pytest.raises(jobflow.UnknownCommandError, match=r"unknown command \('Ghost', 1\)"):
            registry.get_command("Ghost", 1)

    def test_command_without_handler(self, registry: JobRegistry) -> None:
        """A registered command with no handler is an UnknownCommandError saying so."""

        class Orphan(jobflow.Command, registry=registry):
            pass

        with pytest.raises(jobflow.UnknownCommandError, match="has no handler"):
            registry.handler_for("Orphan", 1)
