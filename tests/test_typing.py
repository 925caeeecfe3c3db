"""jobflow ships ``py.typed``: an application that uses it type-checks under ``mypy --strict``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

APP = """
from datetime import timedelta

import jobflow


class SendEmail(jobflow.Job, name="SendEmail", version=2):
    to: str

    def execute(self, ctx: jobflow.JobContext) -> None:
        ctx.log.info("sending")


class Charge(jobflow.Command, name="Charge"):
    amount: int


@jobflow.command_handler(Charge)
async def charge(command: Charge, ctx: jobflow.CommandContext) -> None:
    pass


def produce(scheduler: jobflow.JobScheduler) -> list[str]:
    first = scheduler.schedule(SendEmail(to="a@example.com"), delay=timedelta(seconds=5))
    second = scheduler.schedule_now(jobflow.PublishCommandJob.create(Charge(amount=5)))
    return [first, second]


def main() -> None:
    with jobflow.InstantJobScheduler() as scheduler:
        print(len(produce(scheduler)), "jobs ran")


if __name__ == "__main__":
    main()
"""


def test_a_user_application_type_checks_strictly(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(APP)
    # Outside the project: mypy sees the installed jobflow, as an application's checker would.
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--python-version", "3.11", str(app)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success" in done.stdout
    ran = subprocess.run(
        [sys.executable, str(app)], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip().endswith("2 jobs ran"), ran.stdout


def test_the_marker_is_in_the_package() -> None:
    import jobflow

    assert (Path(jobflow.__file__).parent / "py.typed").is_file()
