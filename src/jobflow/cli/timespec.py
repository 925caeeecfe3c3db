"""Delays and points in time as an operator types them: ``90s``, ``1d12h``, ``PT15M``, ISO-8601 times.

Months and years are refused: their length depends on the calendar, and a delay must mean one
number of milliseconds. Times must carry a timezone, for the same reason.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from jobflow.cli.errors import UsageProblem

_UNITS = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
_COMPACT = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_ISO = re.compile(
    r"P(?:(?P<w>\d+(?:\.\d+)?)W)?(?:(?P<d>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?"
)


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``7d``, ``1d12h``, ``500ms``, ``2w`` or ISO-8601 ``P1DT12H`` / ``PT90S``."""
    raw = text.strip()
    if not raw:
        raise UsageProblem("an empty duration; e.g. 90s, 15m, 2h, 7d, 1d12h or PT15M")
    upper = raw.upper()
    if upper.startswith("P"):
        return _parse_iso_duration(raw, upper)
    parts = _COMPACT.findall(raw.lower())
    if not parts or "".join(n + u for n, u in parts) != raw.lower():
        raise UsageProblem(f"not a duration: {text!r}; e.g. 90s, 15m, 2h, 7d, 1d12h or PT15M")
    return sum((float(n) * _UNITS[u] for n, u in parts), timedelta(0))


def _parse_iso_duration(text: str, upper: str) -> timedelta:
    match = _ISO.fullmatch(upper)
    if match is None or upper in ("P", "PT") or upper.endswith("T"):
        calendar = re.search(r"\d[YM]", upper.partition("T")[0])
        hint = " (months and years have no fixed length: use days)" if calendar else ""
        raise UsageProblem(f"not an ISO-8601 duration: {text!r}{hint}; e.g. PT15M, P7D, P1DT12H")
    values = {k: float(v) for k, v in match.groupdict().items() if v is not None}
    return timedelta(
        weeks=values.get("w", 0),
        days=values.get("d", 0),
        hours=values.get("h", 0),
        minutes=values.get("m", 0),
        seconds=values.get("s", 0),
    )


def parse_time(text: str) -> datetime:
    """An ISO-8601 time with a timezone (``2025-01-31T09:00:00+01:00`` or ``...Z``)."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageProblem(f"not an ISO-8601 time: {text!r}; e.g. 2025-01-31T09:00:00+01:00") from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise UsageProblem(f"{text!r} has no timezone; add one, e.g. {text.strip()}Z or {text.strip()}+01:00")
    return value


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A point in time: an ISO-8601 time with a timezone, or a duration meaning that long ago (``2h``)."""
    raw = text.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}.*", raw):
        return parse_time(raw)
    return (now or datetime.now(UTC)) - parse_duration(raw)


def to_millis(delay: timedelta) -> int:
    """A delay in whole milliseconds, refusing a negative one."""
    if delay < timedelta(0):
        raise UsageProblem(f"a delay cannot be negative (got {delay})")
    return int(delay.total_seconds() * 1000)
