"""S3 benchmarks: dataset download throughput, and how much checkpoint uploads slow training.

    python benchmarks/bench_s3.py                        # starts a local SeaweedFS on 127.0.0.1
    python benchmarks/bench_s3.py --rounds 5 --small 1000

1. Download: the same objects fetched by a sequential boto3 loop (get_object, then write) and by
   lora_trainer's Downloader (parallel, every object verified), alternating, each into a fresh folder;
   median of `rounds`. Two shapes: many small files (an image dataset) and a few large ones (model
   shards, multipart-uploaded). Twice: on loopback (no latency, no per-connection limit: CPU-bound, the
   worst case for parallel requests), and through a delay line with S3's performance model: `--rtt-ms`
   per round trip and `--stream-mbps` per connection (AWS quotes ~85-90 MB/s for one connection).
2. Upload overhead: one tiny training run writing to a local folder and one writing to s3://, with a
   checkpoint every few steps, alternating. The time the training thread spent inside the S3 mirror
   (staging + queueing: what training waits for); the CPU the uploads cost (all threads of the trainer
   process, measured by uploading the same checkpoints again with nothing else running) and the S3
   server's CPU, which here share two cores with training (in a pod S3 is elsewhere, and a GPU run leaves
   CPU cores idle); and the loop's wall time (on_start to on_end, before the final sync; best of
   `rounds`), which on a shared machine mostly measures the other load.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT / "trainer_image" / "lora_trainer" / "sample_data"


def start_seaweed(workdir: Path):
    from tests.cluster.s3 import SeaweedS3

    return SeaweedS3(workdir).start()


# -- 1. downloads
class DelayLine:
    """A TCP relay to host:port that delays every byte by rtt/2 each way and caps each connection at
    `stream_mbps` (chunks are scheduled, not slept on): the S3 performance model of one latency per
    request and a bandwidth limit per connection."""

    def __init__(self, upstream: str, rtt: float, stream_mbps: float):
        self.host, port = upstream.split("://", 1)[1].split(":")
        self.port, self.delay, self.rate = int(port), rtt / 2, stream_mbps * 1e6
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        ready.set()
        self.loop.run_forever()

    async def _relay(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader, writer) -> None:
        free = 0.0  # when this connection's bandwidth is free again
        try:
            while data := await reader.read(1 << 16):
                free = max(self.loop.time() + self.delay, free) + len(data) / self.rate
                self.loop.call_at(free, writer.write, data)
        except ConnectionError:
            pass
        self.loop.call_at(max(self.loop.time() + self.delay, free), writer.close)


def put_objects(client, bucket: str, prefix: str, count: int, size: int, multipart: bool = False) -> int:
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=8 * 2**20, multipart_chunksize=8 * 2**20)

    def put(i: int) -> None:
        body = os.urandom(size)
        if multipart:
            import io

            client.upload_fileobj(io.BytesIO(body), bucket, f"{prefix}/shard-{i:05d}.safetensors", Config=config)
        else:
            client.put_object(Bucket=bucket, Key=f"{prefix}/img-{i:05d}.png", Body=body)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(count)))
    return count * size


def sequential_loop(client, bucket: str, prefix: str, dest: Path) -> float:
    """What a script without a transfer layer does: list, then get each object in turn."""
    started = time.perf_counter()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    for obj in (o for page in pages for o in page.get("Contents", [])):
        path = dest / obj["Key"]
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"]
            for chunk in iter(lambda body=body: body.read(1 << 20), b""):
                handle.write(chunk)
    return time.perf_counter() - started


def ours(client, bucket: str, prefix: str, dest: Path, concurrency: int) -> float:
    from lora_trainer.storage.client import Retry
    from lora_trainer.storage.download import Downloader
    from lora_trainer.storage.uri import S3Uri

    started = time.perf_counter()
    Downloader(client, dest, Retry(), concurrency).download(S3Uri(bucket, prefix))
    return time.perf_counter() - started


def bench_downloads(s3, args) -> list[tuple]:
    import boto3
    from botocore.config import Config

    from lora_trainer.storage.client import make_client

    setup = s3.client()
    bucket = "bench-download"
    setup.create_bucket(Bucket=bucket)
    shapes = [
        (
            f"{args.small} x {args.small_kb} KB (images)",
            "small",
            put_objects(setup, bucket, "small", args.small, args.small_kb * 1024),
        ),
        (
            f"{args.large} x {args.large_mb} MB (shards)",
            "large",
            put_objects(setup, bucket, "large", args.large, args.large_mb * 2**20, multipart=True),
        ),
    ]
    os.environ.update(s3.env())  # the trainer's client reads the standard AWS environment
    rows = []
    for network, rtt in (
        ("loopback", 0.0),
        (f"{args.rtt_ms:g} ms, {args.stream_mbps:g} MB/s/conn", args.rtt_ms / 1000),
    ):
        endpoint = DelayLine(s3.endpoint_url, rtt, args.stream_mbps).url if rtt else s3.endpoint_url
        plain = boto3.client(
            "s3", endpoint_url=endpoint, region_name=s3.region, config=Config(retries={"mode": "standard"})
        )
        fast = make_client(endpoint, args.concurrency + 4)
        for label, prefix, total in shapes:
            seq, par = [], []
            for _ in range(args.rounds):
                for runner, times in (
                    (lambda d, prefix=prefix, plain=plain: sequential_loop(plain, bucket, prefix, d), seq),
                    (lambda d, prefix=prefix, fast=fast: ours(fast, bucket, prefix, d, args.concurrency), par),
                ):
                    dest = Path(tempfile.mkdtemp(prefix="bench-s3-"))
                    try:
                        times.append(runner(dest))
                    finally:
                        shutil.rmtree(dest)
            s, p = statistics.median(seq), statistics.median(par)
            rows.append((network, label, total / 1e6, s, total / 1e6 / s, p, total / 1e6 / p, s / p))
    return rows


# -- 2. upload overhead
def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in a process group (the S3 server), from /proc."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp ...; utime, stime are 14, 15
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def upload_cpu_seconds(out: Path, bucket: str) -> float:
    """CPU seconds (all threads of this process) that uploading the run's step checkpoints again costs, with
    nothing else running in the process: what the uploads take from training on a machine without spare cores."""
    from lora_trainer.checkpoint import list_checkpoints
    from lora_trainer.storage.client import Retry, make_client
    from lora_trainer.storage.store import Store
    from lora_trainer.storage.uri import S3Uri

    store = Store(make_client(None, 20), Retry())
    started = time.process_time()
    for ckpt in list_checkpoints(out):
        files = [ckpt.weights, *sorted(p for p in ckpt.state_dir.rglob("*") if p.is_file())]
        store.put_files([(p, S3Uri(bucket, f"replay/{p.relative_to(out).as_posix()}")) for p in files])
    spent = time.process_time() - started
    store.close()
    return spent


def train_once(tmp: Path, s3_env: dict, bucket: str | None, args, server_cpu=lambda: 0.0) -> dict:
    from lora_trainer.config import build_config, config_to_yaml
    from lora_trainer.launch import with_cluster_defaults
    from lora_trainer.observers import BaseObserver
    from lora_trainer.recipe import TrainingRecipe, default_observers
    from lora_trainer.storage.stage import StorageSession

    raw = {
        "base_model": "preset:tiny-sd",
        "train_data_dir": str(SAMPLE / "images"),
        "resolution": 32,
        "lora_rank": args.rank,
        "batch_size": 4,
        "max_train_steps": args.steps,
        "save_steps": args.save_steps,
        "seed": 0,
        "learning_rate": 1e-4,
        "logging_steps": 1000,
        "metrics_port": 0,
        "output_dir": f"s3://{bucket}/run-{time.time_ns()}" if bucket else str(tmp / f"out-{time.time_ns()}"),
        "s3_cache_dir": str(tmp / "cache"),
    }
    os.environ.update(s3_env)
    cfg = with_cluster_defaults(build_config(raw))
    session = StorageSession(cfg, config_to_yaml(cfg))
    local = session.prepare()
    marks: dict[str, float] = {"blocked": 0.0}

    class Clock(BaseObserver):
        def on_start(self, info):
            marks["start"], marks["cpu_start"] = time.perf_counter(), time.process_time()
            marks["server_start"] = server_cpu()

        def on_end(self, summary):
            marks["end"], marks["cpu_end"] = time.perf_counter(), time.process_time()
            marks["server_end"] = server_cpu()

    for mirror in session.mirrors:  # time the training thread spends inside the mirror
        for name in ("on_step", "on_checkpoint"):
            method = getattr(mirror, name)

            def timed(*a, _method=method):
                t = time.perf_counter()
                try:
                    return _method(*a)
                finally:
                    marks["blocked"] += time.perf_counter() - t

            setattr(mirror, name, timed)
    recipe = TrainingRecipe(local, observers=[*default_observers(local), Clock(), *session.mirrors])
    recipe.run()
    done = time.perf_counter()
    session.close()
    replay = upload_cpu_seconds(Path(local.output_dir), bucket) if bucket else 0.0
    checkpoint_bytes = sum(
        p.stat().st_size
        for p in (Path(local.output_dir) / "checkpoints").rglob("*")
        if p.is_file() and "final" not in p.name
    )
    return {
        "loop": marks["end"] - marks["start"],
        "blocked": marks["blocked"],
        "final_sync": done - marks["end"],
        "cpu": marks["cpu_end"] - marks["cpu_start"],
        "server_cpu": marks["server_end"] - marks["server_start"],
        "upload_cpu": replay,
        "save": recipe.summary.timings.get("checkpoint", 0.0),
        "checkpoints": len(recipe.summary.checkpoints),
        "checkpoint_mb": checkpoint_bytes / 1e6 / max(1, len(recipe.summary.checkpoints)),
    }


def bench_uploads(s3, args) -> dict:
    bucket = "bench-upload"
    s3.client().create_bucket(Bucket=bucket)
    server = lambda: group_cpu_seconds(s3.service.proc.pid)  # noqa: E731
    local_runs, s3_runs = [], []
    with tempfile.TemporaryDirectory(prefix="bench-s3-train-") as tmp:
        for _ in range(args.rounds):
            local_runs.append(train_once(Path(tmp), s3.env(), None, args))
            s3_runs.append(train_once(Path(tmp), s3.env(), bucket, args, server))
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {
        "local_loop": min(r["loop"] for r in local_runs),
        "s3_loop": min(r["loop"] for r in s3_runs),
        "blocked": med(s3_runs, "blocked"),
        "final_sync": med(s3_runs, "final_sync"),
        "upload_cpu": med(s3_runs, "upload_cpu"),
        "server_cpu": med(s3_runs, "server_cpu"),
        "checkpoints": s3_runs[0]["checkpoints"],
        "checkpoint_mb": s3_runs[0]["checkpoint_mb"],
        "rounds": args.rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", type=int, default=400, help="number of small objects")
    parser.add_argument("--small-kb", type=int, default=64)
    parser.add_argument("--large", type=int, default=4, help="number of large objects")
    parser.add_argument("--large-mb", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round-trip time of the delay line")
    parser.add_argument("--stream-mbps", type=float, default=85.0, help="bandwidth of one connection (MB/s)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--only", choices=("download", "upload"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-seaweed-") as work:
        s3 = start_seaweed(Path(work))
        try:
            if args.only != "upload":
                rows = bench_downloads(s3, args)
                print(
                    f"\nDataset download from SeaweedFS on 127.0.0.1, median of {args.rounds} "
                    f"(ours: {args.concurrency} parallel requests, every object verified)"
                )
                print("| network | objects | MB | sequential boto3 loop s | MB/s | Downloader s | MB/s | speed-up |")
                print("|---|---|---:|---:|---:|---:|---:|---:|")
                for network, label, mb, s, smbs, p, pmbs, ratio in rows:
                    print(
                        f"| {network} | {label} | {mb:.0f} | {s:.2f} | {smbs:.0f} | {p:.2f} | {pmbs:.0f} "
                        f"| {ratio:.1f}x |"
                    )
            if args.only != "download":
                r = bench_uploads(s3, args)
                overhead = (r["s3_loop"] - r["local_loop"]) / r["local_loop"]
                print(
                    f"\nCheckpoint uploads during training: tiny SD, rank {args.rank}, {args.steps} steps, "
                    f"a checkpoint every {args.save_steps} ({r['checkpoints']} x {r['checkpoint_mb']:.1f} MB), "
                    f"{r['rounds']} rounds"
                )
                print(
                    "| training thread inside the S3 mirror s (median) | share of the loop "
                    "| CPU s of the uploads (whole run) | share of the loop if all taken from training "
                    "| CPU s of the S3 server | training loop s, local / s3:// output (best) | wall-time difference "
                    "| final sync after the loop s |"
                )
                print("|---:|---:|---:|---:|---:|---:|---:|---:|")
                print(
                    f"| {r['blocked']:.3f} | {r['blocked'] / r['s3_loop']:.2%} | {r['upload_cpu']:.2f} "
                    f"| {r['upload_cpu'] / r['local_loop']:.2%} | {r['server_cpu']:.2f} "
                    f"| {r['local_loop']:.1f} / {r['s3_loop']:.1f} | {overhead:+.1%} | {r['final_sync']:.2f} |"
                )
        finally:
            s3.stop()


if __name__ == "__main__":
    main()
