"""Secrets kept out of what a run prints or writes: logs, termination messages, config_backup.yaml,
EXPERIMENT.md, the metadata of weight files; locally and on S3.

Three kinds are removed: the values of secret environment variables (AWS_SECRET_ACCESS_KEY, any *_TOKEN,
*_PASSWORD, *_API_KEY, ...), the user:password part of URLs, and secret query parameters of URLs
(presigned S3 signatures, ?token=...).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

SECRET_ENV_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|API_?KEY|CREDENTIAL|PRIVATE_KEY", re.IGNORECASE)
MIN_SECRET_LENGTH = 4  # shorter values would blank out ordinary words of the message
URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")  # scheme://user:password@host
SECRET_QUERY = re.compile(
    r"(?<=[?&])((?:x-amz-)?(?:signature|credential|security-token)|sig|token|access_token|password|secret"
    r"|api_?key)=[^&#\s\"']+",
    re.IGNORECASE,
)
HIDDEN = "***"


def secret_values(env: Mapping[str, str]) -> list[str]:
    """The values of the environment's secret variables, longest first (so none is half-replaced)."""
    values = {v for k, v in env.items() if SECRET_ENV_NAME.search(k) and v and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, env: Mapping[str, str] = os.environ) -> str:
    """`text` without secret values known from the environment, URL passwords and secret URL parameters."""
    for value in secret_values(env):
        text = text.replace(value, HIDDEN)
    text = URL_CREDENTIALS.sub(HIDDEN + "@", text)
    return SECRET_QUERY.sub(lambda m: f"{m.group(0).split('=', 1)[0]}={HIDDEN}", text)
