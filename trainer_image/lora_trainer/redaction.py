"""Secrets kept out of what a run prints or writes: logs, termination messages, records."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
MIN_SECRET_LENGTH = 4  # shorter values would blank out ordinary words of the message
URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")  # scheme://user:password@host


def redact(text: str, env: Mapping[str, str] = os.environ) -> str:
    """Removes secret values known from the environment, and passwords in URLs, from a message."""
    for name in SECRET_ENV:
        value = env.get(name)
        if value and len(value) >= MIN_SECRET_LENGTH:
            text = text.replace(value, "***")
    return URL_CREDENTIALS.sub("***@", text)
