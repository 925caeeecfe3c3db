"""What travels as the actor's argument inside a Dramatiq message: (name, version, JSON data)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from jobflow.errors import InvalidPayloadError


class _Envelope(BaseModel):
    # Unknown keys are ignored so that an older worker can run what a newer producer wrote.
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str = Field(min_length=1)
    version: int = Field(ge=1)
    data: dict[str, Any]

    @classmethod
    def parse(cls, raw: Any) -> Any:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise InvalidPayloadError(f"not a valid {cls.__name__}: {exc}") from exc

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class JobEnvelope(_Envelope):
    """One scheduled job: its id, type, data and when it is due."""

    job_id: str = Field(min_length=1)
    scheduled_at: AwareDatetime
    due_at: AwareDatetime


class CommandEnvelope(_Envelope):
    """One command on its way to the command-bus actor."""

    command_id: str = Field(min_length=1)
    #: The job that published it, when a PublishCommandJob did.
    job_id: str | None = None
    sent_at: datetime
