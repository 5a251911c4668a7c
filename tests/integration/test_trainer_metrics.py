"""The trainer's metrics against the real Prometheus and Pushgateway: scraped during the run (queryable by
PromQL), and held by the Pushgateway after the process exited."""

from __future__ import annotations

import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.procs import free_port, wait_until
from tests.integration.trainer_world import TrainerProcess, sd_config, termination_message

pytestmark = pytest.mark.integration


def pushed_samples(pushgateway_url: str, job_name: str) -> dict[str, float]:
    """name -> value of the samples the Pushgateway holds for this trainer job."""
    with urllib.request.urlopen(f"{pushgateway_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("job_name") == job_name and s.labels.get("job") == "lora-train" and "le" not in s.labels
    }


def test_prometheus_scrapes_the_trainer_and_the_pushgateway_keeps_the_final_metrics(tmp_path, prometheus, pushgateway):
    job, namespace, port = f"cats-{uuid.uuid4().hex[:6]}", "team-a", free_port()
    config = sd_config(
        tmp_path,
        None,
        max_train_steps=50,
        save_steps=25,
        logging_steps=5,
        metrics_port=port,
        pushgateway_url=pushgateway.url,
    )
    env = {"POD_IP": "127.0.0.1", "LORA_JOB_NAME": job, "LORA_JOB_NAMESPACE": namespace}
    prometheus.set_targets([f"127.0.0.1:{port}"])
    run = TrainerProcess(tmp_path, config, env, "metrics")
    try:
        selector = f'{{job_name="{job}",namespace="{namespace}",job="pods"}}'
        loss = prometheus.wait_for(f"lora_train_loss{selector} > 0", timeout=600)  # after the first step
        assert run.proc.poll() is None, "the run ended before Prometheus saw it"  # during the run
        assert 0 < float(loss[0]["value"][1]) < 10
        step = prometheus.wait_for(f"lora_train_step{selector} > 0", timeout=60)
        total = prometheus.query(f"lora_train_total_steps{selector}")
        assert float(total[0]["value"][1]) == 50 and 0 < float(step[0]["value"][1]) <= 50
        assert prometheus.wait_for(f"lora_train_samples_total{selector} > 0", timeout=60)
        assert prometheus.query(f"histogram_quantile(0.5, lora_train_step_seconds_bucket{selector})")
        assert run.wait(600) == 0, run.output()[-3000:]
    finally:
        run.kill()
        prometheus.set_targets([])

    final = pushed_samples(pushgateway.url, job)  # the exit push: the process is gone, the numbers stay
    assert final["lora_train_step"] == 50 and final["lora_train_total_steps"] == 50
    assert final["lora_train_samples_total"] == 100  # 50 steps x batch 2
    assert final["lora_train_step_seconds_count"] == 50
    assert final["lora_train_loss"] == pytest.approx(termination_message(config)["loss"], abs=1e-5)
    assert "lora_train_checkpoint_seconds" in final and "lora_train_gpu_memory_bytes" in final
    pushed = f'lora_train_step{{job="lora-train",job_name="{job}",namespace="{namespace}"}}'
    wait_until(
        lambda: prometheus.query(pushed) and float(prometheus.query(pushed)[0]["value"][1]) == 50,
        30,
        "Prometheus to scrape the pushed final step",
    )
