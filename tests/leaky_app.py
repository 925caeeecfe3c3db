"""A job whose data and services hold secrets, for the logging tests: `dramatiq jobflow.actors tests.leaky_app`.

Its first attempt fails with an expected TransientError, its second with an unexpected error; with
two attempts allowed, it is then dead-lettered. Its ``execute`` keeps the secrets in local
variables, where a traceback with locals would show them.
"""

from __future__ import annotations

from datetime import timedelta

import jobflow

CARD_NUMBER = "4929-5550-1234-0071"
API_KEY = "sk_live_9yWq2ZtR7uVb"
DSN_PASSWORD = "Pg-h0rse-battery-77"
DSN = f"postgresql://payments:{DSN_PASSWORD}@db.internal:5432/payments"
SECRETS = (CARD_NUMBER, API_KEY, DSN_PASSWORD)

jobflow.default_registry.services["payments_db"] = DSN

FAST_TWICE = jobflow.RetryPolicy(max_attempts=2, backoff=timedelta(milliseconds=10), jitter=0)


class ChargeCard(jobflow.Job, name="ChargeCard", version=1, retry=FAST_TWICE):
    card_number: str
    api_key: str

    def execute(self, ctx: jobflow.JobContext) -> None:
        dsn = ctx.services["payments_db"]
        card, key = self.card_number, self.api_key
        assert all((dsn, card, key))
        if ctx.attempt == 1:
            raise jobflow.TransientError("the gateway timed out")
        raise RuntimeError("the gateway declined the charge")
