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

The operator runs as its Deployment would: when it exits (e.g. after losing its leader lease) it is started
again, and each restart is reported with its exit code and last ERROR line.

Reported, per phase and in all: operator peak RSS (VmHWM) and final RSS (VmRSS), CPU seconds and % of one core
(/proc), API requests per second by verb and resource (the audit log), reconcile duration p50/p95 from the
operator's histogram lora_operator_reconcile_seconds (interpolated within buckets, as PromQL's
histogram_quantile does), lora_operator_reconcile_errors_total (must be 0) and the load average; and the
reaction seen from outside, through watches: a job's watch ADDED -> its first status write, -> its pod, ->
Unschedulable in its status, -> Succeeded. The operator's own figures are sampled every 2 s per process and
added up over processes. Nothing is mocked; the machine's other load shows in the numbers. Exit status 0 when
everything settled without a restart or a reconcile error and peak RSS is under --rss-target-mib.
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

RECONCILE_SECONDS = "lora_operator_reconcile_seconds"
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


class OperatorSampler(threading.Thread):
    """Every `period` seconds, per operator process (a restarted operator is a new process with new metrics): its
    CPU seconds, VmRSS, VmHWM, reconcile errors and reconcile-duration buckets, and the 1-minute load average.
    Totals over a window add up the processes, so a restart loses at most one period of one process's counts."""

    def __init__(self, op, period=2.0):
        super().__init__(daemon=True)
        self.op, self.period = op, period
        self.samples = []  # dicts: t, pid, cpu_s, rss_mib, hwm_mib, load1, errors, buckets
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def run(self):
        while not self.stop.wait(self.period):
            self.sample()

    def sample(self):
        """One sample of the current process (still readable while it is a zombie: CPU seconds only)."""
        with self._lock:
            pid = self.op.proc.pid
            try:
                entry = {"t": time.time(), "pid": pid, "cpu_s": proc_cpu_seconds(pid), "load1": os.getloadavg()[0]}
                entry.update(rss_mib=proc_rss_mib(pid), hwm_mib=proc_peak_rss_mib(pid))
            except OSError:  # reaped
                return
            try:
                entry.update(errors=self.op.metric("lora_operator_reconcile_errors_total"))
                entry.update(buckets=histogram_buckets(self.op, RECONCILE_SECONDS))
            except OSError:  # not serving (starting, stopping)
                pass
            self.samples.append(entry)

    def _at(self, pid, t, key):
        """The last value of `key` of process `pid` sampled at or before `t` (zero before its first)."""
        found = [e[key] for e in self.samples if e["pid"] == pid and e["t"] <= t and e.get(key) is not None]
        return found[-1] if found else None

    def delta(self, key, t0, t1):
        """What `key` (a counter, or a list of bucket counts) grew by in [t0, t1], summed over processes."""
        total = None
        for pid in dict.fromkeys(e["pid"] for e in self.samples):
            end, start = self._at(pid, t1, key), self._at(pid, t0, key)
            if end is None:
                continue
            if isinstance(end, list):
                start = start or [(bound, 0) for bound, _ in end]
                grown = [(bound, count - before) for (bound, count), (_, before) in zip(end, start, strict=True)]
                total = grown if total is None else [(b, c + d) for (b, c), (_, d) in zip(total, grown, strict=True)]
            else:
                total = (total or 0) + end - (start or 0)
        return total

    def window(self, t0, t1):
        inside = [e for e in self.samples if t0 <= e["t"] <= t1]
        cpu = self.delta("cpu_s", t0, t1) or 0
        return {
            "wall_s": t1 - t0,
            "cpu_s": cpu,
            "cpu_percent_of_one_core": 100 * cpu / max(t1 - t0, 1e-9),
            "rss_mib_max": max((e["rss_mib"] for e in inside if e.get("rss_mib")), default=None),
            "load1_mean": sum(e["load1"] for e in inside) / len(inside) if inside else None,
            "reconcile_errors": self.delta("errors", t0, t1),
            "reconcile_seconds": reconcile_seconds(self.delta("buckets", t0, t1)),
        }

    def peak_rss_mib(self):
        return max((e["hwm_mib"] for e in self.samples if e.get("hwm_mib")), default=None)


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


def histogram_quantile(buckets, q):
    """The q-quantile of the observations in `buckets`, interpolated linearly within its bucket as PromQL's
    histogram_quantile does."""
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return f">{lower:g}"  # beyond the last finite bucket: its bound is all that is known
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return lower


def reconcile_seconds(buckets):
    return {
        "p50": histogram_quantile(buckets, 0.5),
        "p95": histogram_quantile(buckets, 0.95),
        "count": buckets[-1][1] if buckets else 0,
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


def jobs_gauge(op):
    """lora_operator_jobs by phase, or None while the operator does not answer (just restarted)."""
    try:
        return {
            phase: op.metric("lora_operator_jobs", {"phase": phase}) for phase in ("Pending", "Running", "Succeeded")
        }
    except OSError:
        return None


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
    parser.add_argument(
        "--timeout", type=float, default=1800, help="bound of the settle phase, seconds (then it reports as it is)"
    )
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
        sampler = OperatorSampler(op)
        sampler.start()
        stack.callback(sampler.stop.set)
        time.sleep(2)
        results["operator_idle"] = {
            "rss_mib": proc_rss_mib(op.proc.pid),
            "peak_rss_mib": proc_peak_rss_mib(op.proc.pid),
        }
        restarts = []

        def supervise():
            """Restart an operator that exited, as its Deployment would (restartPolicy Always), and note it."""
            sampler.sample()  # its last CPU seconds, readable until it is reaped
            if not op.running:
                this_run = op.log_tail(400).rsplit("===== start", 1)[-1]  # OperatorProcess marks each start
                tail = [line for line in this_run.splitlines() if " ERROR " in line]
                restarts.append(
                    {"at": time.time(), "exit_code": op.proc.returncode, "last_error": tail[-1][:300] if tail else None}
                )
                op.start(wait_ready=False)

        def supervised_wait(done, seconds):
            """Wait until done() or `seconds` passed, keeping the operator up; whether done() came true."""
            deadline = time.time() + seconds
            while time.time() < deadline:
                supervise()
                if done():
                    return True
                time.sleep(2)
            return done()

        # 1. create
        train_set = set(training)
        manifests = [
            training_manifest(n, "bench", args.cpu) if n in train_set else waiting_manifest(n, "bench")
            for n in sorted([*waiting, *training], key=lambda n: n.split("-")[1])
        ]
        sampler.sample()
        marks = {"start": time.time()}
        create_all(cluster.api, manifests, args.create_threads)
        marks["created"] = time.time()

        # 2. settle
        def settled():
            return all(n in watcher.finished for n in training) and all(n in watcher.unschedulable for n in waiting)

        results["settled"] = supervised_wait(settled, args.timeout)
        marks["settled"] = time.time()

        # 3. steady
        supervised_wait(lambda: False, args.steady_seconds)
        sampler.sample()
        marks["end"] = time.time()
        sampler.stop.set()

        requests = audit_requests(cluster.audit_log)
        added = watcher.job_added
        outcomes = Counter(watcher.finished[n][1] for n in training if n in watcher.finished)
        listing = cluster.api.get(env_ltj_path(NAMESPACE))["items"]
        phases = Counter(
            f"{(j.get('status') or {}).get('phase')}/{(j.get('status') or {}).get('reason')}" for j in listing
        )
        results["phases"] = {
            phase: {
                **sampler.window(marks[first], marks[last]),
                "api": request_rates(requests, marks[first], marks[last]),
            }
            for phase, first, last in (
                ("create", "start", "created"),
                ("settle", "created", "settled"),
                ("steady", "settled", "end"),
            )
        }
        whole = sampler.window(marks["start"], marks["end"])
        results["operator"] = {
            "peak_rss_mib": sampler.peak_rss_mib(),
            "final_rss_mib": proc_rss_mib(op.proc.pid),
            "cpu_s_total": whole["cpu_s"],
            "cpu_percent_of_one_core_total": whole["cpu_percent_of_one_core"],
            "api_requests_per_second_total": request_rates(requests, marks["start"], marks["end"])["per_second"],
            "reconcile_seconds_total": whole["reconcile_seconds"],
            "reconcile_errors_total": whole["reconcile_errors"],
            "restarts": [{**r, "at": r["at"] - marks["start"]} for r in restarts],
            "jobs_gauge": jobs_gauge(op),
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
            results["settled"]
            and not restarts
            and results["operator"]["reconcile_errors_total"] == 0
            and outcomes == Counter({"Succeeded": len(training)})
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
