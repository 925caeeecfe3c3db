"""Scraping a worker's ``/metrics`` over HTTP, as Prometheus does, and reading series from it."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(port: int, timeout: float = 5.0) -> Series:
    """Every sample ``http://127.0.0.1:<port>/metrics`` serves, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(series: Series, metric: str, labels: dict[str, str]) -> float | None:
    """The sample ``metric`` with exactly ``labels``; None if it is not served."""
    return series.get((metric, frozenset(labels.items())))


def job_labels(name: str, version: int, queue: str, kind: str = "job") -> dict[str, str]:
    return {"kind": kind, "name": name, "version": str(version), "queue": queue}
