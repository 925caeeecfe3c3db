"""Delays and times as an operator types them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jobflow.cli.errors import UsageProblem
from jobflow.cli.timespec import parse_duration, parse_since, parse_time, to_millis


class TestParseDuration:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("90s", timedelta(seconds=90)),
            ("15m", timedelta(minutes=15)),
            ("2h", timedelta(hours=2)),
            ("7d", timedelta(days=7)),
            ("1d12h", timedelta(days=1, hours=12)),
            ("500ms", timedelta(milliseconds=500)),
            ("2w", timedelta(weeks=2)),
            ("PT15M", timedelta(minutes=15)),
            ("P7D", timedelta(days=7)),
            ("P1DT12H", timedelta(days=1, hours=12)),
            ("pt1.5s", timedelta(seconds=1.5)),
        ],
    )
    def test_accepted_forms(self, text: str, expected: timedelta) -> None:
        """Compact units, combinations of them and ISO-8601 durations all parse to the same timedelta."""
        assert parse_duration(text) == expected

    @pytest.mark.parametrize("text", ["", "soon", "15", "15x", "-5m", "1h-", "P", "PT", "P1DT"])
    def test_refuses_what_is_not_a_duration(self, text: str) -> None:
        """Anything that is not one number of milliseconds is a usage problem naming examples."""
        with pytest.raises(UsageProblem, match=r"e\.g\."):
            parse_duration(text)

    @pytest.mark.parametrize("text", ["P1M", "P1Y", "P1Y2M"])
    def test_refuses_months_and_years(self, text: str) -> None:
        """Months and years have no fixed length, and the message says so."""
        with pytest.raises(UsageProblem, match="no fixed length"):
            parse_duration(text)

    def test_to_millis(self) -> None:
        """A delay becomes whole milliseconds; a negative one is refused."""
        assert to_millis(timedelta(seconds=1.5)) == 1500
        with pytest.raises(UsageProblem):
            to_millis(timedelta(seconds=-1))


class TestParseTime:
    def test_aware_times(self) -> None:
        """ISO-8601 times with an offset or Z parse to aware datetimes."""
        assert parse_time("2030-01-31T09:00:00+01:00") == datetime(2030, 1, 31, 8, tzinfo=UTC)
        assert parse_time("2030-01-31T08:00:00Z") == datetime(2030, 1, 31, 8, tzinfo=UTC)

    def test_naive_time_is_refused(self) -> None:
        """A time without a timezone is a usage problem that shows how to add one."""
        with pytest.raises(UsageProblem, match="no timezone"):
            parse_time("2030-01-31T09:00:00")

    def test_since_accepts_a_time_or_a_duration_ago(self) -> None:
        """--since takes an aware time, or a duration meaning that long before now."""
        now = datetime(2030, 1, 1, 12, tzinfo=UTC)
        assert parse_since("2h", now) == datetime(2030, 1, 1, 10, tzinfo=UTC)
        assert parse_since("2029-12-31T00:00:00Z", now) == datetime(2029, 12, 31, tzinfo=UTC)
        with pytest.raises(UsageProblem):
            parse_since("2029-12-31", now)
