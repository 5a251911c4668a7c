"""Training progress from the trainer's Prometheus endpoint (http://$POD_IP:9400/metrics).

`parse_metrics(text)` turns one scrape into a ProgressSample (pure; unit-tested on real exposition
text); `scrape(session, url)` fetches it. The same endpoint is what Prometheus scrapes for Grafana,
so `status.progress` and the dashboards never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


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
            if key is None or key in values or sample.value is None or not math.isfinite(sample.value):
                continue
            values[key] = int(sample.value) if key in _INTS else float(sample.value)
            if key == "checkpoint_step" and sample.labels.get("uri"):
                values["checkpoint_uri"] = sample.labels["uri"]
    if not values:
        return None
    return ProgressSample(**values)


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


async def scrape(session: Any, url: str, timeout: float) -> ProgressSample | None:
    """GET the metrics page; None when the trainer is not serving (yet) or answers garbage."""
    import aiohttp

    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                return None
            text = await response.text()
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None
    return parse_metrics(text)
