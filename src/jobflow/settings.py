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

    broker_url: str = Field(default=DEFAULT_BROKER_URL, description="memory://, amqp:// or amqps://")
    queue_prefix: str = Field(default=DEFAULT_QUEUE_PREFIX, pattern=r"^[A-Za-z0-9_.-]+$")
    queue_type: Literal["classic", "quorum"] = "classic"
    #: The delay ladder is quorum by default: classic dead-lettering is at-most-once, and lost a few
    #: of 10,000 pending delayed jobs in flight across a RabbitMQ restart in our benchmark.
    delay_queue_type: Literal["classic", "quorum"] = "quorum"
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_payload_bytes: int = Field(
        default=DEFAULT_MAX_PAYLOAD_BYTES, ge=1024, description="largest encoded message a scheduler sends"
    )
