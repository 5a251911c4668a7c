"""Prometheus and Pushgateway (Debian packages) on 127.0.0.1 with a 1 s scrape interval.

Prometheus scrapes two jobs: `pods`, whose targets come from a file_sd JSON file that
Prometheus.set_targets() rewrites (pod IPs such as 127.0.0.12:9090), and `pushgateway` with
honor_labels so pushed job/instance labels survive. Configuration files are written as JSON, which
is valid YAML.
"""

import json
import os
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tests.cluster.procs import Service, free_port, wait_until


def find_binary(name, env_var, env=os.environ):
    path = env.get(env_var) or shutil.which(name)
    if not path:
        raise FileNotFoundError(
            f"{name} not found: run scripts/test-services.sh (apt-get install "
            f"prometheus prometheus-pushgateway) or set {env_var}"
        )
    return path


def scrape_config(targets_file, pushgateway=None, interval="1s"):
    """The prometheus.yml document (a dict)."""
    jobs = [
        {
            "job_name": "pods",
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": interval}],
        }
    ]
    if pushgateway:
        jobs.append(
            {
                "job_name": "pushgateway",
                "honor_labels": True,
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "static_configs": [{"targets": [pushgateway]}],
            }
        )
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": jobs,
    }


def file_sd(targets, labels=None):
    """The file_sd_configs document for a list of 'host:port' targets."""
    return [{"targets": list(targets), "labels": dict(labels or {})}] if targets else []


def _get_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _ready(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status == 200


class Pushgateway:
    """Attributes: url (http://127.0.0.1:PORT), address (127.0.0.1:PORT)."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.url = f"http://{self.address}"
        self.service = None

    def start(self, timeout=60):
        argv = [
            find_binary("prometheus-pushgateway", "LORA_PUSHGATEWAY_BIN"),
            f"--web.listen-address={self.address}",
            "--persistence.file=",
            "--log.level=info",
        ]
        self.service = Service("pushgateway", argv, self.workdir / "pushgateway.log").start()
        wait_until(lambda: self.service.check_running() or _ready(f"{self.url}/-/ready"), timeout, "pushgateway ready")
        return self

    def stop(self):
        if self.service:
            self.service.stop()

    def log_tails(self, lines=40):
        return {"pushgateway": self.service.log_tail(lines)} if self.service else {}


class Prometheus:
    """Attributes: url. Methods: set_targets, query, wait_for."""

    def __init__(self, workdir, pushgateway=None, interval="1s"):
        self.workdir = Path(workdir)
        self.pushgateway = pushgateway
        self.interval = interval
        self.address = f"127.0.0.1:{free_port()}"
        self.url = f"http://{self.address}"
        self.targets_file = self.workdir / "targets.json"
        self.service = None

    def start(self, timeout=60):
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        self.set_targets([])
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps(scrape_config(self.targets_file, self.pushgateway, self.interval), indent=2))
        argv = [
            find_binary("prometheus", "LORA_PROMETHEUS_BIN"),
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={self.address}",
            "--storage.tsdb.retention.time=1d",
            "--web.enable-lifecycle",
            "--log.level=info",
        ]
        self.service = Service("prometheus", argv, self.workdir / "prometheus.log").start()
        wait_until(lambda: self.service.check_running() or _ready(f"{self.url}/-/ready"), timeout, "prometheus ready")
        return self

    def stop(self):
        if self.service:
            self.service.stop()

    def set_targets(self, targets, labels=None):
        """Scrape exactly these 'host:port' targets in job `pods` (file replaced atomically)."""
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(file_sd(targets, labels)))
        os.replace(tmp, self.targets_file)

    def query(self, promql):
        """Instant query; returns data.result (a list of {'metric': {...}, 'value': [t, 'v']})."""
        answer = _get_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        if answer.get("status") != "success":
            raise RuntimeError(f"PromQL {promql!r} failed: {answer}")
        return answer["data"]["result"]

    def wait_for(self, promql, predicate=bool, timeout=30, interval=0.5):
        """Query until predicate(result) is true; returns the result, TimeoutError with the last one."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"PromQL {promql!r}: predicate still false after {timeout}s; last result {result}")
            time.sleep(interval)

    def targets(self):
        """Active scrape targets as Prometheus sees them (scrapeUrl, health, lastError...)."""
        return _get_json(f"{self.url}/api/v1/targets")["data"]["activeTargets"]

    def log_tails(self, lines=40):
        return {"prometheus": self.service.log_tail(lines)} if self.service else {}
