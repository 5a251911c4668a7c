"""The operator at scale on the real control plane: --scale-jobs live LoRATrainingJobs, most waiting for GPUs.

    .venv/bin/python benchmarks/bench_operator_scale.py --scale-jobs 1000 --training-jobs 24
    .venv/bin/python benchmarks/bench_operator_scale.py --scale-jobs 50 --training-jobs 4 --steady-seconds 60

The cluster is bench_operator.py's (etcd + kube-apiserver + kube-controller-manager, the node agent, SeaweedFS,
the operator as a local process under its least-privilege ServiceAccount, with its default settings), except:
  - the node is CPU-only: it advertises no nvidia.com/gpu, so the jobs with spec.resources.gpus: 1 ("waiting")
    get their ConfigMap, Job and pod, and the pod stays Pending/Unschedulable for the whole run;
  - --training-jobs of the jobs are tiny CPU runs (gpus: 0, 2 steps of preset:tiny-llm), spread among the
    others; the node's CPU (--node-cpu / --cpu) bounds how many train at once;
  - kube-apiserver writes an audit log of the requests the operator's ServiceAccount sends (and of nothing
    else), which gives the operator's API requests per second, by verb and resource, from the server's side.

Phases: 1. create: every job is POSTed straight to the apiserver (--create-threads in parallel), waiting and
training jobs interleaved; 2. settle: until every training job is Succeeded and every waiting job's status says
Unschedulable; 3. steady: --steady-seconds with all jobs still there, nothing changing but the operator's resyncs.

Reported: operator peak RSS (VmHWM) and final RSS (VmRSS), CPU seconds and % of one core per phase (/proc),
API requests per second per phase, reconcile duration p50/p95 from the operator's histogram
lora_operator_reconcile_seconds (interpolated within buckets, as PromQL's histogram_quantile does), reaction
latency seen from outside (watch ADDED of a job -> its first status write, -> its pod, -> Unschedulable in
its status), lora_operator_reconcile_errors_total (must be 0) and the load average. Nothing is mocked; the
machine's other load shows in the numbers. Exit status 0 when there are no reconcile errors, every training job
Succeeded, every waiting job is Unschedulable and peak RSS is under --rss-target-mib.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_operator import (  # noqa: E402
    NAMESPACE,
    Watcher,
    env_ltj_path,
    operator_world,
    percentile,
    proc_cpu_seconds,
    proc_peak_rss_mib,
)
from tests.cluster.controlplane import KubeCluster  # noqa: E402
from tests.cluster.kubeapi import ApiError  # noqa: E402
from tests.e2e import operator_env as env  # noqa: E402

OPERATOR_USER = f"system:serviceaccount:{env.OPERATOR_NAMESPACE}:lora-operator"
# Only the operator's requests are recorded (Metadata: who, verb, resource, when; no bodies), once each:
# RequestReceived is left out, so a plain request is one ResponseComplete event and a watch one
# ResponseStarted plus one ResponseComplete (counted once, by auditID). Everything else is not audited.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata", "users": [OPERATOR_USER]}, {"level": "None"}],
}


class AuditedCluster(KubeCluster):
    """KubeCluster whose kube-apiserver audits the operator's ServiceAccount to workdir/audit.log."""

    def _service(self, name, argv):
        if name == "kube-apiserver":
            policy = self.workdir / "audit-policy.yaml"
            policy.write_text(yaml.safe_dump(AUDIT_POLICY))
            self.audit_log = self.workdir / "audit.log"
            argv = [*argv, f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}"]
        return super()._service(name, argv)


class ScaleWatcher(Watcher):
    """bench_operator's Watcher, plus each job's first status write and first Unschedulable reason; its watches
    resume from the last resourceVersion seen (bookmarks included) instead of relisting 1000 objects every
    30 s, which would cost the apiserver as much as the operator and could drop events in between."""

    def __init__(self, api, namespace):
        super().__init__(api, namespace)
        self.first_status, self.unschedulable = {}, {}

    def _watch(self, path, handle):
        rv = None
        while not self.stop.is_set():
            try:
                if rv is None:
                    listing = self.api.get(path)
                    rv = listing["metadata"]["resourceVersion"]
                    for obj in listing.get("items") or []:
                        handle("LISTED", obj, time.time())
                for kind, obj in self.api.watch(path, rv, timeout_seconds=60):
                    rv = obj["metadata"]["resourceVersion"]
                    if kind != "BOOKMARK":
                        handle(kind, obj, time.time())
            except ApiError as err:
                if err.status == 410:  # too old: list again
                    rv = None
                time.sleep(0.2)
            except Exception:  # noqa: BLE001 - reconnect from the same resourceVersion
                time.sleep(0.2)

    def _on_job(self, kind, obj, now):
        super()._on_job(kind, obj, now)
        status = obj.get("status") or {}
        name = obj["metadata"]["name"]
        if status:
            self.first_status.setdefault(name, now)
        if status.get("reason") == "Unschedulable":
            self.unschedulable.setdefault(name, now)


class ProcSampler(threading.Thread):
    """Samples the operator's VmRSS and the 1-minute load average every `period` seconds."""

    def __init__(self, pid, period=2.0):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples = []  # (time, rss MiB, load1)
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(self.period):
            self.samples.append((time.time(), proc_rss_mib(self.pid), os.getloadavg()[0]))

    def window(self, t0, t1):
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        return {
            "rss_mib_max": max((s[1] for s in inside), default=None),
            "load1_mean": sum(s[2] for s in inside) / len(inside) if inside else None,
        }


def proc_rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def waiting_manifest(name, bucket):
    """A job that needs a GPU the CPU-only node does not have: its pod stays Pending/Unschedulable."""
    return env.llm_manifest(name, bucket, steps=2, save_steps=0, resources={"gpus": 1, "cpu": "1", "memory": "2Gi"})


def training_manifest(name, bucket, cpu):
    return env.llm_manifest(name, bucket, steps=2, save_steps=0, resources={"gpus": 0, "cpu": cpu, "memory": "2Gi"})


def job_names(total, training):
    """(waiting names, training names); the training jobs are spread evenly among the waiting ones."""
    every = max(total // max(training, 1), 1)
    train_at = {i * every for i in range(training)}
    waiting = [f"wait-{i:04d}" for i in range(total) if i not in train_at]
    return waiting, [f"train-{i:04d}" for i in sorted(train_at)]


def create_all(api, manifests, threads):
    """POST every job manifest, in order, with `threads` in parallel."""
    path = env_ltj_path(NAMESPACE)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda m: api.create(path, m), manifests))


def audit_requests(path, user=OPERATOR_USER):
    """[(time received, verb, resource[/subresource])] of `user`'s requests in an audit log, one per auditID."""
    seen, out = set(), []
    with open(path, encoding="utf-8") as log:
        for line in log:
            event = json.loads(line)
            if event["user"].get("username") != user or event["auditID"] in seen:
                continue
            seen.add(event["auditID"])
            ref = event.get("objectRef") or {}
            resource = ref.get("resource", event["requestURI"].split("?")[0])
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            received = datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
            out.append((received, event["verb"], resource))
    return out


def request_rates(requests, t0, t1):
    """Requests per second in [t0, t1), and the count by 'verb resource', most first."""
    inside = [r for r in requests if t0 <= r[0] < t1]
    by_kind = Counter(f"{verb} {resource}" for _, verb, resource in inside)
    return {
        "requests": len(inside),
        "per_second": len(inside) / max(t1 - t0, 1e-9),
        "by_verb_resource": dict(by_kind.most_common()),
    }


def histogram_buckets(op, name):
    """[(upper bound, cumulative count)] of a histogram on the operator's /metrics, ascending."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets = []
    for family in text_string_to_metric_families(op.metrics_text()):
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
    return sorted(buckets)


def histogram_quantile(buckets, q, since=None):
    """The q-quantile of the observations in `buckets` (less those in `since`, an earlier snapshot),
    interpolated linearly within its bucket as PromQL's histogram_quantile does."""
    if since:
        buckets = [(bound, count - before) for (bound, count), (_, before) in zip(buckets, since, strict=True)]
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower  # beyond the last finite bucket: its bound is all that is known
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return lower


def reconcile_seconds(buckets, since=None):
    return {
        "p50": histogram_quantile(buckets, 0.5, since),
        "p95": histogram_quantile(buckets, 0.95, since),
        "count": (buckets[-1][1] - (since[-1][1] if since else 0)) if buckets else 0,
    }


def latency(watcher_field, added, names):
    values = [watcher_field[n] - added[n] for n in names if n in watcher_field and n in added]
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": percentile(values, 0.5),
        "p95": percentile(values, 0.95),
        "max": max(values),
    }


def cpu_window(cpu0, cpu1, t0, t1):
    return {"cpu_s": cpu1 - cpu0, "cpu_percent_of_one_core": 100 * (cpu1 - cpu0) / max(t1 - t0, 1e-9)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale-jobs", type=int, default=1000, help="LoRATrainingJobs in all")
    parser.add_argument("--training-jobs", type=int, default=24, help="of which tiny CPU runs (the rest wait)")
    parser.add_argument("--cpu", default="2", help="CPU request of each training pod")
    parser.add_argument(
        "--node-cpu", default="8", help="the node's allocatable CPU (8 with --cpu 2: 4 trainers at once)"
    )
    parser.add_argument("--create-threads", type=int, default=16, help="parallel POSTs of the jobs")
    parser.add_argument("--steady-seconds", type=float, default=180, help="length of the steady phase")
    parser.add_argument("--poll-interval", default="5", help="LORA_OPERATOR_POLL_INTERVAL (the default: 5)")
    parser.add_argument("--rss-target-mib", type=float, default=300)
    parser.add_argument("--timeout", type=float, default=3600, help="bound of the settle phase, seconds")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    waiting, training = job_names(args.scale_jobs, args.training_jobs)
    work = Path(tempfile.mkdtemp(prefix="lora-bench-scale-"))
    results = {
        "jobs": {"total": args.scale_jobs, "waiting_for_gpu": len(waiting), "training": len(training)},
        "cpus": os.cpu_count(),
        "code": os.environ.get("PYTHONPATH") or str(REPO),
        "load_average_start": os.getloadavg(),
    }
    # a CPU-only node: no nvidia.com/gpu at all
    allocatable = {"cpu": args.node_cpu, "memory": "64Gi", "pods": "250", "nvidia.com/gpu": None}
    operator_env = {
        "LORA_OPERATOR_POLL_INTERVAL": args.poll_interval,
        "LORA_OPERATOR_LEASE_DURATION": "15",  # the default (the e2e harness shortens it)
        "LORA_OPERATOR_LOG_LEVEL": "WARNING",
    }
    # the trainers import the code the operator imports (PYTHONPATH can point both at another checkout)
    image_env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
    ok = False
    with contextlib.ExitStack() as stack:
        cluster, _, op = stack.enter_context(
            operator_world(
                work, allocatable, operator_env, "bench-scale", cluster_class=AuditedCluster, image_env=image_env
            )
        )
        watcher = ScaleWatcher(cluster.api, NAMESPACE)
        watcher.start()
        stack.callback(watcher.stop.set)
        pid = op.proc.pid
        sampler = ProcSampler(pid)
        sampler.start()
        stack.callback(sampler.stop.set)
        time.sleep(2)
        results["operator_idle"] = {"rss_mib": proc_rss_mib(pid), "peak_rss_mib": proc_peak_rss_mib(pid)}

        # 1. create
        train_set = set(training)
        manifests = [
            training_manifest(n, "bench", args.cpu) if n in train_set else waiting_manifest(n, "bench")
            for n in sorted([*waiting, *training], key=lambda n: n.split("-")[1])
        ]
        hist = "lora_operator_reconcile_seconds"
        snap = {"start": (time.time(), proc_cpu_seconds(pid), histogram_buckets(op, hist))}
        create_all(cluster.api, manifests, args.create_threads)
        snap["created"] = (time.time(), proc_cpu_seconds(pid), histogram_buckets(op, hist))

        # 2. settle
        def settled():
            return all(n in watcher.finished for n in training) and all(n in watcher.unschedulable for n in waiting)

        env.wait_until(settled, args.timeout, "training jobs Succeeded and waiting jobs Unschedulable", interval=2)
        snap["settled"] = (time.time(), proc_cpu_seconds(pid), histogram_buckets(op, hist))

        # 3. steady
        time.sleep(args.steady_seconds)
        snap["end"] = (time.time(), proc_cpu_seconds(pid), histogram_buckets(op, hist))
        sampler.stop.set()

        requests = audit_requests(cluster.audit_log)
        added = watcher.job_added
        outcomes = Counter(watcher.finished[n][1] for n in training if n in watcher.finished)
        listing = cluster.api.get(env_ltj_path(NAMESPACE))["items"]
        phases = Counter(
            f"{(j.get('status') or {}).get('phase')}/{(j.get('status') or {}).get('reason')}" for j in listing
        )
        results["phases"] = {}
        for phase, first, last in (
            ("create", "start", "created"),
            ("settle", "created", "settled"),
            ("steady", "settled", "end"),
        ):
            (t_a, cpu_a, hist_a), (t_b, cpu_b, hist_b) = snap[first], snap[last]
            results["phases"][phase] = {
                "wall_s": t_b - t_a,
                **cpu_window(cpu_a, cpu_b, t_a, t_b),
                **sampler.window(t_a, t_b),
                "reconcile_seconds": reconcile_seconds(hist_b, since=hist_a),
                "api": request_rates(requests, t_a, t_b),
            }
        (t0, cpu0, _), (t_end, cpu_end, hist_end) = snap["start"], snap["end"]
        reconciles = op.metric(f"{hist}_count")
        results["operator"] = {
            "peak_rss_mib": proc_peak_rss_mib(pid),
            "final_rss_mib": proc_rss_mib(pid),
            "cpu_s_total": cpu_end - cpu0,
            "cpu_percent_of_one_core_total": 100 * (cpu_end - cpu0) / max(t_end - t0, 1e-9),
            "api_requests_per_second_total": request_rates(requests, t0, t_end)["per_second"],
            "reconcile_seconds_total": reconcile_seconds(hist_end),
            "reconcile_seconds_mean": op.metric(f"{hist}_sum") / max(reconciles or 1, 1),
            "reconcile_errors_total": op.metric("lora_operator_reconcile_errors_total"),
            "jobs_gauge": {
                phase: op.metric("lora_operator_jobs", {"phase": phase})
                for phase in ("Pending", "Running", "Succeeded", "Failed")
            },
        }
        results["reaction_from_watch_s"] = {
            "job_added_to_first_status_write": latency(watcher.first_status, added, [*waiting, *training]),
            "job_added_to_pod_created": latency(watcher.pod_created, added, [*waiting, *training]),
            "job_added_to_unschedulable_in_status": latency(watcher.unschedulable, added, waiting),
            "job_added_to_succeeded": latency({n: v[0] for n, v in watcher.finished.items()}, added, training),
        }
        results["jobs"]["training_outcomes"] = dict(outcomes)
        results["jobs"]["phase_reason_at_end"] = dict(phases.most_common())
        results["load_average_end"] = os.getloadavg()
        ok = (
            results["operator"]["reconcile_errors_total"] == 0
            and outcomes == Counter({"Succeeded": len(training)})
            and all(n in watcher.unschedulable for n in waiting)
            and results["operator"]["peak_rss_mib"] < args.rss_target_mib
        )
    results["ok"] = ok
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
