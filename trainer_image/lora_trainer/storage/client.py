"""The S3 client, and what to do when a call fails: retry it, or stop with an error a person can act on.

Credentials, region and endpoint come from the standard AWS chain (environment, ~/.aws/config, IRSA and
web identity tokens, instance roles), so nothing here handles a secret. `AWS_ENDPOINT_URL_S3` (read by
botocore itself) or the `s3_endpoint_url` config key point it at an S3-compatible store.

Two layers of retry: botocore's `standard` mode retries each request a few times at once (5xx,
throttling, connection errors), and `Retry` retries the whole operation with exponential backoff and
full jitter until a deadline, so an S3 outage of minutes is waited out. Errors that retrying cannot fix
(bad credentials, a missing bucket, access denied) stop at once as StorageError (exit 6, permanent);
an outage longer than the deadline ends as StorageUnavailableError (exit 8, retried by the operator).
"""

from __future__ import annotations

import enum
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import StorageError, StorageUnavailableError
from ..redaction import redact

log = logging.getLogger("lora_trainer")
T = TypeVar("T")

TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "SlowDown",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "ProvisionedThroughputExceededException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "PriorRequestNotComplete",
    }
)
CREDENTIALS = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "InvalidClientTokenId",
        "AuthorizationHeaderMalformed",
        "MissingSecurityHeader",
        "AccountProblem",
        "AllAccessDisabled",
    }
)


class IntegrityError(Exception):
    """A transfer whose size or checksum does not match what S3 reported: retried like a network error."""


class Kind(enum.Enum):
    TRANSIENT = "transient"  # retry with backoff
    PERMANENT = "permanent"  # stop: retrying cannot help
    NOT_FOUND = "not_found"  # a missing key: the caller decides what that means


def make_client(endpoint_url: str | None = None, max_connections: int = 16, env: Mapping[str, str] = os.environ):
    """A boto3 S3 client from the standard AWS environment; `endpoint_url` overrides the endpoint."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": 3},  # botocore's quick retries; Retry waits out outages
        connect_timeout=10,  # seconds: a reachable endpoint answers in well under 1 s, even across regions
        read_timeout=60,  # seconds between bytes: a 16 MiB part on a slow link, never a whole transfer
        max_pool_connections=max_connections,
        tcp_keepalive=True,
    )
    # botocore reads AWS_DEFAULT_REGION only; the operator and most tools set AWS_REGION
    region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or None
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, region_name=region, config=config)


def error_code(err: BaseException) -> tuple[str, int | None]:
    """(error code, HTTP status) of a botocore ClientError; ('', None) for anything else."""
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return "", None
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status


def classify(err: BaseException) -> Kind | None:
    """TRANSIENT, PERMANENT or NOT_FOUND for storage errors; None for errors that are not about storage."""
    from botocore import exceptions as bx

    if isinstance(err, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.NoRegionError)):
        return Kind.PERMANENT
    if isinstance(err, bx.ClientError):
        code, status = error_code(err)
        if code in TRANSIENT_CODES or status in (408, 429) or (status or 0) >= 500:
            return Kind.TRANSIENT
        if code in ("NoSuchKey", "NotFound") or (status == 404 and code in ("404", "")):
            return Kind.NOT_FOUND
        return Kind.PERMANENT
    if isinstance(
        err,
        (
            bx.ConnectionError,
            bx.HTTPClientError,
            bx.ResponseStreamingError,
            bx.FlexibleChecksumError,
            bx.IncompleteReadError,
            ConnectionError,
            TimeoutError,
        ),
    ):
        return Kind.TRANSIENT
    if isinstance(err, IntegrityError):
        return Kind.TRANSIENT
    if type(err).__module__.startswith(("s3transfer", "urllib3")):  # RetriesExceededError, ProtocolError
        return Kind.TRANSIENT
    return None


def describe(err: BaseException, what: str) -> str:
    """A message naming what failed and why; built from codes only, so no secret can leak into it."""
    from botocore import exceptions as bx

    code, status = error_code(err)
    if isinstance(err, bx.NoCredentialsError):
        return (
            f"{what}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "a profile, or a pod role (IRSA / web identity)"
        )
    if code in CREDENTIALS:
        return (
            f"{what}: S3 rejected the credentials ({code}); check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or the pod's role) and the endpoint"
        )
    if status == 403 and code in ("403", ""):
        return (
            f"{what}: S3 refused the request (HTTP 403): wrong credentials or no permission; check "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the pod's role) and the bucket policy"
        )
    if code == "AccessDenied":
        return f"{what}: access denied; the credentials lack permission for this bucket or prefix"
    if code == "NoSuchBucket" or (status == 404 and code in ("404", "")):
        return f"{what}: the bucket does not exist"
    if code:
        return f"{what}: {code} (HTTP {status})"
    return f"{what}: {type(err).__name__}: {redact(str(err))}"


@dataclass
class Retry:
    """How long and how fast transient errors are retried: for `seconds` after an operation first fails.

    Backoff is exponential with full jitter (AWS architecture blog), capped at `cap` seconds.
    `clock`, `sleep` and `rng` are injectable so tests need no real waiting.
    """

    seconds: float = 300.0  # s3_retry_seconds' default: a store restart or failover, not a dead endpoint
    base: float = 0.5
    cap: float = 15.0  # so a recovered store is noticed within ~15 s
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        return self.rng.uniform(0, min(self.cap, self.base * 2**attempt))

    def start(self) -> Backoff:
        return Backoff(self)

    def call(self, op: Callable[[], T], what: str, missing: Callable[[BaseException], T] | None = None) -> T:
        """op(), retried; `missing` handles NOT_FOUND (default: a permanent StorageError)."""
        backoff = self.start()
        while True:
            try:
                return op()
            except Exception as err:  # noqa: BLE001 - classified in after(); unknown errors re-raised as they are
                if missing is not None and classify(err) is Kind.NOT_FOUND:
                    return missing(err)
                backoff.after(err, what)


class Backoff:
    """The retry budget of one operation; after(err) raises, or sleeps before the next attempt."""

    def __init__(self, retry: Retry):
        self.retry, self.attempt, self.deadline = retry, 0, None

    def after(self, err: BaseException, what: str) -> None:
        kind = classify(err)
        if kind is None:
            raise err
        if kind is not Kind.TRANSIENT:
            raise StorageError(describe(err, what)) from None
        retry, now = self.retry, self.retry.clock()
        self.deadline = self.deadline if self.deadline is not None else now + retry.seconds
        pause = retry.delay(self.attempt)
        if now + pause > self.deadline:
            raise StorageUnavailableError(
                f"{what}: S3 still failing after {retry.seconds:g} s of retries ({describe(err, 'last error')})"
            ) from None
        log.warning("%s; retrying in %.1f s", describe(err, what), pause)
        retry.sleep(pause)
        self.attempt += 1


def probe_bucket(client: Any, bucket: str, retry: Retry) -> None:
    """Fails fast (StorageError) on wrong credentials or a missing bucket, before any work starts."""

    def missing(err: BaseException) -> None:
        raise StorageError(f"s3://{bucket}: the bucket does not exist (check the bucket name and endpoint)")

    retry.call(lambda: client.head_bucket(Bucket=bucket), f"s3://{bucket}", missing=missing)
