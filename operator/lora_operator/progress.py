"""Training progress from the trainer's Prometheus endpoint (http://$POD_IP:9400/metrics).

`parse_metrics(text)` turns one scrape into a ProgressSample (pure; unit-tested on real exposition
text); `scrape(session, url)` fetches it. The same endpoint is what Prometheus scrapes for Grafana,
so `status.progress` and the dashboards never disagree.

The trainer image is the user's: a scrape reads at most METRICS_BYTE_LIMIT bytes, never decompressed,
parses them off the event loop, and keeps only values of the expected type and range.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# a trainer's page is a few KiB; a page this big is not one (and parsing it would hold the event loop)
METRICS_BYTE_LIMIT = 256 * 1024
LABEL_LIMIT = 2048  # the checkpoint URI label; longer is not a URI status should carry
MAX_COUNT = 2**53


@dataclass(frozen=True)
class ProgressSample:
    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    loss: float | None = None
    learning_rate: float | None = None
    samples_total: float | None = None
    step_seconds_sum: float | None = None
    step_seconds_count: float | None = None
    samples_per_second: float | None = None  # set by `with_rate` from two scrapes, else from the sums
    eta_seconds: float | None = None
    checkpoint_step: int | None = None
    checkpoint_uri: str | None = None
    labeling_images: int | None = None  # auto_label: images to caption before training
    labeled_images: int | None = None

    def labeling(self) -> tuple[int, int] | None:
        """(captioned, to caption) while auto_label is still captioning, else None."""
        total, done = self.labeling_images or 0, self.labeled_images or 0
        return (done, total) if done < total else None

    @property
    def mean_step_seconds(self) -> float | None:
        if self.step_seconds_count and self.step_seconds_sum is not None and self.step_seconds_count > 0:
            return self.step_seconds_sum / self.step_seconds_count
        return None

    def eta(self) -> float | None:
        if self.eta_seconds is not None:
            return self.eta_seconds
        mean = self.mean_step_seconds
        if mean is None or self.step is None or not self.total_steps:
            return None
        return max(self.total_steps - self.step, 0) * mean

    def sps(self) -> float | None:
        if self.samples_per_second is not None:
            return self.samples_per_second
        if self.samples_total and self.step_seconds_sum:
            return self.samples_total / self.step_seconds_sum
        return None

    def as_status(self) -> dict[str, Any]:
        """status.progress fields (without updatedAt), rounded so noise alone never rewrites status."""
        out: dict[str, Any] = {}
        for key, value in (("step", self.step), ("totalSteps", self.total_steps), ("epoch", self.epoch)):
            if value is not None:
                out[key] = int(value)
        for key, value, digits in (
            ("loss", self.loss, 5),
            ("learningRate", self.learning_rate, 4),
            ("samplesPerSecond", self.sps(), 3),
        ):
            rounded = _round(value, digits)
            if rounded is not None:
                out[key] = rounded
        eta = format_duration(self.eta())
        if eta is not None:
            out["eta"] = eta
        return out


def format_duration(seconds: float | None) -> str | None:
    """4m10s, 1h2m, 12s (kubectl-style, two units at most)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    total = int(round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _round(value: float | None, significant: int) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    if value == 0:
        return 0.0
    return float(f"{value:.{significant}g}")


# sample name -> ProgressSample field
_GAUGES = {
    "lora_train_step": "step",
    "lora_train_total_steps": "total_steps",
    "lora_train_epoch": "epoch",
    "lora_train_loss": "loss",
    "lora_train_learning_rate": "learning_rate",
    "lora_train_samples_total": "samples_total",
    "lora_train_step_seconds_sum": "step_seconds_sum",
    "lora_train_step_seconds_count": "step_seconds_count",
    "lora_train_eta_seconds": "eta_seconds",
    "lora_train_last_checkpoint_step": "checkpoint_step",
    "lora_train_checkpoint_step": "checkpoint_step",
    "lora_train_labeling_images": "labeling_images",
    "lora_train_labeled_images": "labeled_images",
}
_INTS = {"step", "total_steps", "epoch", "checkpoint_step", "labeling_images", "labeled_images"}


def parse_metrics(text: str) -> ProgressSample | None:
    """A ProgressSample from Prometheus exposition text; None when no lora_train_* metric is there."""
    values: dict[str, Any] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, TypeError, IndexError):
        return None
    for family in families:
        for sample in family.samples:
            key = _GAUGES.get(sample.name)
            if key is None or key in values or not _plausible(key, sample.value):
                continue
            values[key] = int(sample.value) if key in _INTS else float(sample.value)
            uri = sample.labels.get("uri")
            if key == "checkpoint_step" and uri and len(uri) <= LABEL_LIMIT and uri.isprintable():
                values["checkpoint_uri"] = uri
    if not values:
        return None
    return ProgressSample(**values)


def _plausible(key: str, value: float | None) -> bool:
    """A finite value; counts are whole numbers from 0 to 2**53 (what a JSON status carries exactly)."""
    if value is None or not math.isfinite(value):
        return False
    return key not in _INTS or (0 <= value <= MAX_COUNT and value == int(value))


def with_rate(sample: ProgressSample, previous: ProgressSample | None, seconds: float) -> ProgressSample:
    """samples/s over the interval between two scrapes of the same pod, when it advanced."""
    if (
        previous is None
        or seconds <= 0
        or sample.samples_total is None
        or previous.samples_total is None
        or sample.samples_total <= previous.samples_total
    ):
        return sample
    rate = (sample.samples_total - previous.samples_total) / seconds
    return ProgressSample(**{**sample.__dict__, "samples_per_second": rate})


@dataclass(frozen=True)
class Scrape:
    """One scrape: the sample (None when the trainer is not serving yet or answered nothing usable), and
    why a page was refused (for a Warning Event; None when it was not)."""

    sample: ProgressSample | None = None
    refused: str | None = None


async def scrape(session: Any, url: str, timeout: float, limit: int = METRICS_BYTE_LIMIT) -> Scrape:
    """GET the metrics page: at most `limit` bytes, as sent (no decompression), within `timeout` seconds in
    all, parsed in a worker thread."""
    import aiohttp

    try:
        async with session.get(
            url,
            timeout=aiohttp.ClientTimeout(total=timeout),
            headers={"Accept-Encoding": "identity"},
            auto_decompress=False,
        ) as response:
            if response.status != 200:
                return Scrape()
            encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                return Scrape(refused=f"{url} answered with Content-Encoding {encoding[:40]}; only plain text is read")
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > limit:
                    break
    except (TimeoutError, aiohttp.ClientError, OSError):
        return Scrape()
    if len(body) > limit:
        return Scrape(refused=f"{url} sent more than {limit} bytes of metrics; a trainer's page is a few KiB")
    text = body.decode("utf-8", errors="replace")
    return Scrape(await asyncio.to_thread(parse_metrics, text))
