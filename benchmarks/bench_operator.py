"""Operator benchmark on the real control plane (etcd + kube-apiserver + kube-controller-manager), the
node agent, SeaweedFS and the real trainer (tiny runs on CPU).

    .venv/bin/python benchmarks/bench_operator.py                 # 20 latency jobs, then 100 at once
    .venv/bin/python benchmarks/bench_operator.py --latency-jobs 5 --burst-jobs 20 --out /tmp/bench.json

Measures, with the operator's default settings (poll interval 5 s) under its least-privilege ServiceAccount:
  1. latency: jobs applied one at a time (the next once the previous finished, so trainers do not compete
     for the CPU); per job, time from `kubectl apply` to the trainer pod's creation and to the first
     status.progress (p50/p95), seen through watches;
  2. burst: --burst-jobs jobs applied at once (--apply-processes parallel `kubectl apply`, since one kubectl
     throttles itself to 5 requests/s); time until all are Succeeded (none may fail), the time from each
     job's creation to its pod, the operator's CPU seconds and peak RSS (/proc), and
     lora_operator_reconcile_errors_total (must be 0).
Nothing is mocked; the machine's other load shows in the numbers, so the load average is reported too.
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
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster.controlplane import KubeCluster  # noqa: E402
from tests.cluster.node_agent import NodeAgent  # noqa: E402
from tests.cluster.s3 import SeaweedS3  # noqa: E402
from tests.e2e import operator_env as env  # noqa: E402

NAMESPACE = "bench"


def percentile(values, q):
    ordered = sorted(values)
    if not ordered:
        return None
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Watcher(threading.Thread):
    """Records the first time each job's pod appears and each job's status.progress appears / turns terminal."""

    def __init__(self, api, namespace):
        super().__init__(daemon=True)
        self.api, self.namespace = api, namespace
        self.pod_created, self.first_progress, self.finished, self.job_added = {}, {}, {}, {}
        self.stop = threading.Event()

    def run(self):
        threads = [
            threading.Thread(
                target=self._watch, args=(f"/api/v1/namespaces/{self.namespace}/pods", self._on_pod), daemon=True
            ),
            threading.Thread(target=self._watch, args=(env_ltj_path(self.namespace), self._on_job), daemon=True),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _watch(self, path, handle):
        while not self.stop.is_set():
            try:
                rv = self.api.get(path)["metadata"]["resourceVersion"]
                for kind, obj in self.api.watch(path, rv, timeout_seconds=30):
                    handle(kind, obj, time.time())
            except Exception:  # noqa: BLE001 - reconnect
                time.sleep(0.2)

    def _on_pod(self, kind, obj, now):
        job = (obj["metadata"].get("labels") or {}).get("lora-operator.io/job-name")
        if kind == "ADDED" and job:
            self.pod_created.setdefault(job, now)

    def _on_job(self, kind, obj, now):
        name, status = obj["metadata"]["name"], obj.get("status") or {}
        if kind == "ADDED":
            self.job_added.setdefault(name, now)
        if status.get("progress"):
            self.first_progress.setdefault(name, now)
        if status.get("phase") in ("Succeeded", "Failed"):
            self.finished.setdefault(name, (now, status["phase"], status.get("reason")))


def env_ltj_path(namespace):
    return f"/apis/lora-operator.io/v1alpha1/namespaces/{namespace}/loratrainingjobs"


def proc_cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_peak_rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def job_manifest(name, bucket, cpu):
    return env.llm_manifest(name, bucket, steps=2, save_steps=0, resources={"gpus": 0, "cpu": cpu, "memory": "2Gi"})


def apply(cluster, docs):
    body = {"apiVersion": "v1", "kind": "List", "items": docs}
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(body), timeout=300)


@contextlib.contextmanager
def operator_world(work, allocatable, operator_env, identity="bench", cluster_class=KubeCluster, **node_options):
    """The world the operator benchmarks measure in, stopped on the way out: the control plane (`cluster_class`),
    one node agent (`allocatable`, where None means "not advertised at all"; `node_options`), SeaweedFS with the sample data in bucket 'bench', the CRD and
    RBAC, namespace NAMESPACE with its S3 Secret, and the operator under its ServiceAccount with `operator_env`
    (its S3 settings added). Yields (cluster, node, op)."""
    cluster = cluster_class(work / "kube").start()
    node = s3 = op = None
    try:
        node = NodeAgent(cluster.api, cluster.pki, work / "node", allocatable=allocatable, **node_options)
        for resource in [name for name, quantity in allocatable.items() if quantity is None]:
            node.allocatable.pop(resource)  # NodeAgent adds its defaults to what it is given
        node.start()
        s3 = SeaweedS3(work / "s3").start()
        env.install_crd(cluster)
        env.install_rbac(cluster)
        kubeconfig = env.service_account_kubeconfig(cluster, work / "sa.kubeconfig")
        s3_env = {
            "LORA_OPERATOR_S3_ENDPOINT": s3.endpoint_url,
            "LORA_OPERATOR_S3_REGION": s3.region,
            "LORA_OPERATOR_S3_CREDENTIALS_SECRET": env.S3_SECRET,
        }
        op = env.OperatorProcess(kubeconfig, work / "operator", identity=identity, env={**s3_env, **operator_env})
        op.start()
        cluster.kubectl("create", "namespace", NAMESPACE)
        env.create_s3_secret(cluster, NAMESPACE, s3)
        s3.client().create_bucket(Bucket="bench")
        env.upload_sample_data(s3.client(), "bench")
        yield cluster, node, op
    finally:
        for service in (op, s3, node):
            if service is not None:
                try:
                    service.stop()
                except Exception as err:  # noqa: BLE001
                    print(f"stopping {service}: {err}", file=sys.stderr)
        cluster.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-jobs", type=int, default=20)
    parser.add_argument("--apply-processes", type=int, default=10, help="parallel kubectl apply of the burst")
    parser.add_argument("--burst-jobs", type=int, default=100)
    parser.add_argument(
        "--cpu",
        default="2",
        help="CPU request of each trainer pod (limits concurrency on the 16-CPU node: 2 -> 8 trainers at once)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="bound of the burst phase, seconds")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    results = {"load_average_start": os.getloadavg(), "cpus": os.cpu_count()}
    allocatable = {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "2", "pods": "250"}
    operator_env = {"LORA_OPERATOR_POLL_INTERVAL": "5", "LORA_OPERATOR_LOG_LEVEL": "WARNING"}
    with operator_world(work, allocatable, operator_env) as (cluster, _, op):
        watcher = Watcher(cluster.api, NAMESPACE)
        watcher.start()
        time.sleep(1)
        pid = op.proc.pid
        cpu0, t_start = proc_cpu_seconds(pid), time.time()

        # 1. latency: one job at a time
        applied = {}
        for i in range(args.latency_jobs):
            name = f"lat-{i:03d}"
            applied[name] = time.time()
            apply(cluster, [job_manifest(name, "bench", args.cpu)])
            env.wait_until(lambda name=name: name in watcher.finished, 600, f"{name} to finish", interval=0.5)
        pod_latency = [watcher.pod_created[n] - t for n, t in applied.items() if n in watcher.pod_created]
        progress_latency = [watcher.first_progress[n] - t for n, t in applied.items() if n in watcher.first_progress]
        run_time = [watcher.finished[n][0] - t for n, t in applied.items()]
        results["latency"] = {
            "jobs": len(applied),
            "apply_to_pod_created_s": {
                "p50": percentile(pod_latency, 0.5),
                "p95": percentile(pod_latency, 0.95),
                "max": max(pod_latency),
            },
            "apply_to_first_progress_s": {
                "p50": percentile(progress_latency, 0.5),
                "p95": percentile(progress_latency, 0.95),
                "max": max(progress_latency),
            },
            "apply_to_succeeded_s": {"p50": percentile(run_time, 0.5), "p95": percentile(run_time, 0.95)},
            "phases": sorted({watcher.finished[n][1] for n in applied}),
        }
        cpu1 = proc_cpu_seconds(pid)
        results["latency"]["operator_cpu_s"] = cpu1 - cpu0

        # 2. burst
        names = [f"burst-{i:03d}" for i in range(args.burst_jobs)]
        t0 = time.time()
        chunks = [names[i :: args.apply_processes] for i in range(args.apply_processes)]
        threads = [
            threading.Thread(target=apply, args=(cluster, [job_manifest(n, "bench", args.cpu) for n in chunk]))
            for chunk in chunks
            if chunk
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_applied = time.time()
        rss_samples = []

        def all_done():
            rss = proc_peak_rss_mib(pid)
            rss_samples.append(rss)
            return all(n in watcher.finished for n in names)

        env.wait_until(all_done, args.timeout, "every burst job to finish", interval=2)
        t_done = max(watcher.finished[n][0] for n in names)
        cpu2 = proc_cpu_seconds(pid)
        outcomes = {}
        for n in names:
            outcomes[watcher.finished[n][1]] = outcomes.get(watcher.finished[n][1], 0) + 1
        pod_latency = [watcher.pod_created[n] - t0 for n in names if n in watcher.pod_created]
        reaction = [
            watcher.pod_created[n] - watcher.job_added[n]
            for n in names
            if n in watcher.pod_created and n in watcher.job_added
        ]
        results["burst"] = {
            "jobs": len(names),
            "outcomes": outcomes,
            "kubectl_apply_s": t_applied - t0,
            "all_terminal_after_s": t_done - t0,
            "apply_to_pod_created_s": {
                "p50": percentile(pod_latency, 0.5),
                "p95": percentile(pod_latency, 0.95),
                "max": max(pod_latency),
            },
            "job_created_to_pod_created_s": {
                "p50": percentile(reaction, 0.5),
                "p95": percentile(reaction, 0.95),
                "max": max(reaction),
            },
            "operator_cpu_s": cpu2 - cpu1,
            "operator_cpu_percent_of_one_core": 100 * (cpu2 - cpu1) / max(t_done - t0, 1e-9),
        }
        results["operator"] = {
            "peak_rss_mib": proc_peak_rss_mib(pid),
            "cpu_s_total": cpu2 - cpu0,
            "wall_s": time.time() - t_start,
            "reconcile_errors_total": op.metric("lora_operator_reconcile_errors_total"),
            "reconciles": op.metric("lora_operator_reconcile_seconds_count"),
            "reconcile_seconds_mean": (
                op.metric("lora_operator_reconcile_seconds_sum")
                / max(op.metric("lora_operator_reconcile_seconds_count") or 1, 1)
            ),
            "jobs_succeeded_gauge": op.metric("lora_operator_jobs", {"phase": "Succeeded"}),
        }
        results["load_average_end"] = os.getloadavg()
        watcher.stop.set()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    ok = (
        results["operator"]["reconcile_errors_total"] == 0
        and results["burst"]["outcomes"] == {"Succeeded": args.burst_jobs}
        and results["latency"]["phases"] == ["Succeeded"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
