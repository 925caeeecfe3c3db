"""Settings: every one has a ``JOBFLOW_*`` environment variable and a keyword argument."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobflow.broker.names import DEFAULT_QUEUE_PREFIX

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/"
#: Large data belongs in a store the job reads, not in the broker: 1 MiB per message by default.
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024


class Settings(BaseSettings):
    """jobflow's configuration, read from ``JOBFLOW_*`` variables unless given as arguments."""

    model_config = SettingsConfigDict(env_prefix="JOBFLOW_", frozen=True, extra="forbid")

    broker_url: str = Field(
        default=DEFAULT_BROKER_URL, description="memory://, or amqp:// / amqps:// (cluster nodes comma-separated)"
    )
    queue_prefix: str = Field(default=DEFAULT_QUEUE_PREFIX, pattern=r"^[A-Za-z0-9_.-]+$")
    #: Quorum by default: replicated, and at-least-once on the failure path (a message RabbitMQ
    #: dead-letters is never lost); classic queues dead-letter at most once.
    queue_type: Literal["classic", "quorum"] = "quorum"
    #: The delay ladder is quorum by default: classic dead-lettering is at-most-once, and lost a few
    #: of 10,000 pending delayed jobs in flight across a RabbitMQ restart in our benchmark.
    delay_queue_type: Literal["classic", "quorum"] = "quorum"
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Let log events show job and command data (``JOBFLOW_LOG_JOB_DATA=1``): for development only,
    #: data may hold card numbers, keys, personal data.
    log_job_data: bool = False
    #: Every publish (a schedule, a retry, a dead letter) is confirmed within it or raises
    #: BrokerUnavailableError: no call waits longer on a broker that is down, frozen or blocked.
    publish_timeout: float = Field(default=10.0, gt=0, le=3600, description="seconds")
    #: How long a message of a (name, version) this worker does not know is retried before it is
    #: dead-lettered: in a rolling deploy producers may ship a type before every worker has it.
    unknown_type_retry: float = Field(default=900.0, ge=0, description="seconds")
    #: How long a stopping worker lets its running jobs finish before it exits anyway (what it had
    #: not acked is redelivered). 600 s: Dramatiq's --worker-shutdown-timeout and jobflow's default
    #: time limit, so a job started just before the stop can still finish.
    shutdown_timeout: float = Field(default=600.0, gt=0, description="seconds")
    max_payload_bytes: int = Field(
        default=DEFAULT_MAX_PAYLOAD_BYTES, ge=1024, description="largest encoded message a scheduler sends"
    )
    #: A worker serves Prometheus metrics at /metrics on this port, one for all the processes of
    #: `dramatiq -p N`; None: not served (the series are still counted in each process).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = Field(default="0.0.0.0", description="the address the metrics server listens on")
    #: Experimental, off: workers watch the delay ladder (one elected at a time) and re-time it
    #: when it is behind. In our leader-kill fault test it lost delayed jobs in 2 of 3 runs (31 and
    #: 79 of 1,000) and made them no earlier, so by default a worker re-times the ladder only when
    #: its own consumer reconnects, which lost none.
    ladder_watchdog: bool = False
    #: Queues a worker consumes besides those of its registered types (short names, comma-separated):
    #: a queue a release moved its types away from, until what waits there has run.
    extra_queues: str = Field(default="", pattern=r"^[A-Za-z0-9_.,\s-]*$")

    #: How far ahead the driving worker publishes each recurring schedule's occurrences (through the
    #: delay ladder, so each starts on time): a failover shorter than this delays none.
    schedule_ahead: float = Field(default=10.0, ge=1, le=3600, description="seconds")

    def extra_queue_names(self) -> list[str]:
        """``extra_queues`` as short names."""
        return [name.strip() for name in self.extra_queues.split(",") if name.strip()]
