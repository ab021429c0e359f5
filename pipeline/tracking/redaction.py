"""What must never be logged: environment values whose names look secret (AWS_SECRET_ACCESS_KEY,
tokens, passwords) and passwords inside URLs. Everything the project logs as text goes through `redact`."""

from __future__ import annotations

import os
import re

REDACTED = "***"


_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|PASSPHRASE|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_KEY|SESSION_KEY"
                          r"|(^|_)KEY$|(^|_)AUTH$", re.IGNORECASE)


_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)(?P<password>[^/\s@]+)@")


_MIN_SECRET_LEN = 6  # shorter values ("1", "token") would redact ordinary words


def _environ_snapshot() -> dict[str, str]:
    """A copy of os.environ. MLflow's telemetry thread sets and deletes variables while others read
    them, and a copy taken meanwhile raises KeyError or RuntimeError: take it again."""
    for _ in range(100):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return dict(os.environ)


def secret_values() -> list[str]:
    """Values of environment variables whose names look secret, longest first."""
    values = {v for k, v in _environ_snapshot().items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with secret environment values and URL passwords (`scheme://user:PASSWORD@host`) masked."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}{REDACTED}@", text)
    for value in secret_values():
        text = text.replace(value, REDACTED)
    return text

