"""Reading progress from the trainer's Prometheus text, and the operator's settings from the environment."""

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lora_operator.progress import ProgressSample, format_duration, parse_metrics, with_rate
from lora_operator.settings import DEFAULT_TRAINER_IMAGE, Settings, SettingsError


def exposition(step=12, total=40, loss=0.4321, lr=5e-4, samples=48, step_times=(0.5,) * 12):
    registry = CollectorRegistry()
    labels = {"job_name": "cats", "namespace": "team-a"}
    names = list(labels)
    Gauge("lora_train_step", "s", names, registry=registry).labels(**labels).set(step)
    Gauge("lora_train_total_steps", "t", names, registry=registry).labels(**labels).set(total)
    Gauge("lora_train_loss", "l", names, registry=registry).labels(**labels).set(loss)
    Gauge("lora_train_learning_rate", "lr", names, registry=registry).labels(**labels).set(lr)
    Counter("lora_train_samples", "n", names, registry=registry).labels(**labels).inc(samples)
    histogram = Histogram("lora_train_step_seconds", "h", names, registry=registry).labels(**labels)
    for t in step_times:
        histogram.observe(t)
    return generate_latest(registry).decode()


def test_parse_the_trainer_metrics():
    sample = parse_metrics(exposition())
    assert (sample.step, sample.total_steps, sample.loss, sample.learning_rate) == (12, 40, 0.4321, 5e-4)
    assert sample.samples_total == 48 and sample.mean_step_seconds == pytest.approx(0.5)
    assert sample.eta() == pytest.approx(14.0)
    assert sample.sps() == pytest.approx(8.0)
    assert sample.as_status() == {
        "step": 12,
        "totalSteps": 40,
        "loss": 0.4321,
        "learningRate": 0.0005,
        "samplesPerSecond": 8.0,
        "eta": "14s",
    }


def test_parse_the_real_trainer_exposition():
    metrics = pytest.importorskip("lora_trainer.metrics")
    from lora_trainer.observers import RunInfo, StepStats

    m = metrics.TrainerMetrics("cats", "team-a")
    m.on_start(RunInfo(total_steps=50, start_step=0, epochs=1, device="cpu", trainable_parameters=10))
    m.on_step(
        StepStats(
            step=7,
            total_steps=50,
            epoch=1,
            epochs=1,
            loss=0.25,
            learning_rate=1e-3,
            grad_norm=0.1,
            samples=4,
            tokens=0,
            step_seconds=0.2,
        )
    )
    sample = parse_metrics(m.render().decode())
    assert (sample.step, sample.total_steps, sample.loss, sample.learning_rate) == (7, 50, 0.25, 1e-3)
    assert sample.samples_total == 4 and sample.eta() == pytest.approx(43 * 0.2)


def test_parse_auto_label_progress_from_the_real_trainer():
    metrics = pytest.importorskip("lora_trainer.metrics")
    m = metrics.TrainerMetrics("cats", "team-a")
    assert parse_metrics(m.render().decode()).labeling() is None  # nothing to caption
    m.on_labeling(0, 30)
    assert parse_metrics(m.render().decode()).labeling() == (0, 30)
    m.on_labeling(30, 30)
    assert parse_metrics(m.render().decode()).labeling() is None  # done: training starts


@pytest.mark.parametrize("text", ["", "garbage {{{", "# HELP other_metric x\nother_metric 1\n"])
def test_no_trainer_metrics_means_no_sample(text):
    assert parse_metrics(text) is None


def test_rate_between_two_scrapes():
    first, second = ProgressSample(samples_total=10), ProgressSample(samples_total=30)
    assert with_rate(second, first, 4.0).sps() == 5.0
    assert with_rate(second, None, 4.0) is second
    assert with_rate(first, second, 4.0) is first  # a restarted trainer's counter went down


@pytest.mark.parametrize(
    "seconds,text",
    [
        (0, "0s"),
        (59.4, "59s"),
        (61, "1m1s"),
        (3725, "1h2m"),
        (90061, "1d1h"),
        (None, None),
        (-1, None),
        (float("inf"), None),
    ],
)
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_settings_defaults():
    s = Settings.from_env({})
    assert s.trainer_image == DEFAULT_TRAINER_IMAGE and s.clusterwide and s.leader_election
    assert s.lease_namespace == "default" and s.identity
    assert s.poll_interval == 5.0 and s.trainer_metrics_port == 9400


def test_settings_from_env():
    s = Settings.from_env(
        {
            "LORA_OPERATOR_TRAINER_IMAGE": "example.com/lora-operator/trainer:2",
            "LORA_OPERATOR_S3_ENDPOINT": "http://minio.storage:9000",
            "LORA_OPERATOR_S3_CREDENTIALS_SECRET": "s3-creds",
            "LORA_OPERATOR_WATCH_NAMESPACES": "team-a, team-b,team-a",
            "LORA_OPERATOR_POLL_INTERVAL": "2.5",
            "LORA_OPERATOR_LEADER_ELECTION": "false",
            "POD_NAMESPACE": "lora-system",
            "POD_NAME": "lora-operator-abc",
        }
    )
    assert s.watch_namespaces == ("team-a", "team-b") and not s.clusterwide
    assert s.poll_interval == 2.5 and s.leader_election is False
    assert s.lease_namespace == "lora-system" and s.identity == "lora-operator-abc"
    assert s.s3_endpoint == "http://minio.storage:9000" and s.s3_credentials_secret == "s3-creds"


def test_bad_settings_are_all_named_at_once():
    with pytest.raises(SettingsError) as err:
        Settings.from_env(
            {
                "LORA_OPERATOR_POLL_INTERVAL": "soon",
                "LORA_OPERATOR_HTTP_PORT": "99999",
                "LORA_OPERATOR_S3_ENDPOINT": "minio:9000",
                "LORA_OPERATOR_WATCH_NAMESPACES": "Team_A",
                "LORA_OPERATOR_LEADER_ELECTION": "maybe",
                "LORA_OPERATOR_TRAINER_RUN_AS_USER": "0",
                "LORA_OPERATOR_POLL_INTERVALL": "1",
            }
        )
    text = str(err.value)
    for name in (
        "LORA_OPERATOR_POLL_INTERVAL:",
        "LORA_OPERATOR_HTTP_PORT",
        "LORA_OPERATOR_S3_ENDPOINT",
        "LORA_OPERATOR_WATCH_NAMESPACES",
        "LORA_OPERATOR_LEADER_ELECTION",
        "LORA_OPERATOR_TRAINER_RUN_AS_USER",
        "LORA_OPERATOR_POLL_INTERVALL: unknown setting",
    ):
        assert name in text
    assert "'soon'" in text


def test_settings_reference_documents_every_variable():
    rows = Settings.reference()
    assert len(rows) == len({r[0] for r in rows}) and all(r[0].startswith("LORA_OPERATOR_") and r[2] for r in rows)


def test_operator_imports_neither_torch_nor_the_kubernetes_client():
    import subprocess
    import sys

    code = (
        "import sys, lora_operator.main, lora_operator.handlers, lora_operator.reconcile; "
        "print(sorted(m for m in ('torch', 'kubernetes', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_poller_refreshes_running_jobs_often_and_the_others_rarely():
    from lora_operator.names import JobKey
    from lora_operator.observability import OperatorMetrics
    from lora_operator.reconcile import Context

    ctx = Context(Settings(poll_interval=5), api=None, metrics=OperatorMetrics())
    poller, key = ctx.poller, JobKey("ns", "job")
    assert str(key) == "ns/job"  # as logs name the job
    assert poller.due(key, "Running", 1000.0) and poller.due(key, "Pending", 1000.0)  # never polled yet
    poller.last_poll[key] = 1000.0
    assert not poller.due(key, "Running", 1004.0) and poller.due(key, "Running", 1005.0)
    assert not poller.due(key, "Pending", 1020.0) and not poller.due(key, "Suspended", 1020.0)
    assert poller.due(key, "Pending", 1030.0)
    body = {"metadata": {"namespace": "ns", "name": "job", "uid": "uid-1"}, "spec": {"output": {"uri": "s3://b/o"}}}
    ctx.track(key, {**body, "status": {"phase": "Running"}})
    assert poller.active[key] == "Running"
    assert ctx.jobs.outputs[key].live and ctx.jobs.outputs[key].uri == "s3://b/o"
    ctx.track(key, {**body, "status": {"phase": "Succeeded"}})
    assert key not in poller.active and not ctx.jobs.outputs[key].live


def test_poller_wakes_a_job_at_its_own_deadline():
    import time

    from lora_operator.names import JobKey
    from lora_operator.observability import OperatorMetrics
    from lora_operator.reconcile import Context

    ctx = Context(Settings(poll_interval=5), api=None, metrics=OperatorMetrics())
    poller, key = ctx.poller, JobKey("ns", "group")
    now = time.monotonic()
    poller.last_poll[key] = now
    assert not poller.due(key, "Pending", now + 10)  # Pending: every 30 s
    poller.wake(key, 7)  # a multi-node group is released or retried in 7 s
    assert not poller.due(key, "Pending", now + 6) and poller.due(key, "Pending", now + 8)
    poller.drop(key)
    assert key not in poller.wake_at


def test_the_resync_of_waiting_jobs_costs_at_most_two_reconciles_a_second_however_many_wait():
    from lora_operator.names import JobKey
    from lora_operator.observability import OperatorMetrics
    from lora_operator.poller import MAX_RESYNCS_PER_SECOND
    from lora_operator.reconcile import Context

    poller = Context(Settings(poll_interval=5), api=None, metrics=OperatorMetrics()).poller
    for i in range(10):
        poller.follow(JobKey("ns", f"job-{i}"), "Pending")
    assert poller.resync_interval == 30.0
    for i in range(1000):
        poller.follow(JobKey("ns", f"job-{i}"), "Pending")
    poller.follow(JobKey("ns", "training"), "Running")  # running jobs are polled each interval, not counted
    assert poller.resync_interval == 1000 / MAX_RESYNCS_PER_SECOND
    assert not poller.due(JobKey("ns", "job-1"), "Pending", 400.0) and poller.due(
        JobKey("ns", "job-1"), "Pending", 500.0
    )
    assert poller.due(JobKey("ns", "training"), "Running", 5.0)


def test_no_reconcile_starts_once_the_operator_stopped_leading():
    import asyncio

    from lora_operator.names import JobKey
    from lora_operator.observability import OperatorMetrics
    from lora_operator.reconcile import Context, reconcile

    class NoApi:
        def __getattr__(self, name):
            raise AssertionError(f"the API was called ({name}) after the lease was lost")

    ctx = Context(Settings(poll_interval=5), api=NoApi(), metrics=OperatorMetrics())
    ctx.stopped.set()
    asyncio.run(reconcile(ctx, JobKey("ns", "job")))
    assert ctx.metrics.reconcile_errors._value.get() == 0


def test_requests_for_a_job_whose_reconcile_is_queued_join_it(monkeypatch):
    """A burst of events for one job (its pods', its Job's, its own) costs one reconcile, which sees every
    watched pod; another job is not held up; a failure reaches every caller and is counted once."""
    import asyncio

    from lora_operator import reconcile as rec
    from lora_operator.names import JobKey
    from lora_operator.observability import OperatorMetrics

    runs = []

    async def main():
        gate = asyncio.Event()

        async def fake_reconcile(ctx, key, seen_pods):
            runs.append((key.name, sorted(p["metadata"]["uid"] + p["status"]["phase"] for p in seen_pods)))
            if len(runs) == 1:
                await gate.wait()  # the first reconcile of "job" is under way while the burst comes
            if key.name == "bad":
                raise RuntimeError("API refused")

        monkeypatch.setattr(rec, "_reconcile", fake_reconcile)
        ctx = rec.Context(Settings(poll_interval=5), api=None, metrics=OperatorMetrics())
        job, other, bad = JobKey("ns", "job"), JobKey("ns", "other"), JobKey("ns", "bad")

        def pod(uid, phase):
            return {"metadata": {"uid": uid}, "status": {"phase": phase}}

        first = asyncio.create_task(rec.reconcile(ctx, job, pod("a", "Running")))
        while not runs:
            await asyncio.sleep(0)
        burst = [rec.reconcile(ctx, job, pod("b", "Pending")), rec.reconcile(ctx, job), rec.reconcile(ctx, job)]
        burst += [rec.reconcile(ctx, job, pod("b", "Failed")), rec.reconcile(ctx, job, pod("c", "Running"))]
        burst += [rec.reconcile(ctx, other)]
        later = [asyncio.ensure_future(c) for c in burst]
        failing = [asyncio.ensure_future(rec.reconcile(ctx, bad)) for _ in range(3)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, *later)
        outcomes = await asyncio.gather(*failing, return_exceptions=True)
        assert [type(o) for o in outcomes] == [RuntimeError] * 3
        assert ctx.jobs.queued == {} and ctx.jobs.seen_pods == {}
        return ctx

    ctx = asyncio.run(main())
    assert sorted(runs) == sorted([("job", ["aRunning"]), ("other", []), ("bad", []), ("job", ["bFailed", "cRunning"])])
    assert runs[0] == ("job", ["aRunning"]) and runs[-1] == ("job", ["bFailed", "cRunning"])
    assert ctx.metrics.reconcile_errors._value.get() == 1
