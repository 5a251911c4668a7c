"""Images/s with and without the latent and text-encoder caches, in one run.

    python benchmarks/bench_cache.py [--arch tiny|real] [--device cpu|cuda] [--steps 40]

Three runs of the same training (fresh processes): no cache; caches cold (they are computed during
setup); caches warm (reused from the previous run, as across experiments on one dataset). Training
throughput excludes setup; the one-time cost of filling the cache is the cold run's extra wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import measure  # noqa: E402

CACHES = dict(cache_latents=True, cache_text_encoder_outputs=True, center_crop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    common = (args.arch, "text-to-image", args.steps, args.warmup, args.device)
    with tempfile.TemporaryDirectory() as cache:
        rows = [
            ("no cache", measure("ours", *common, center_crop=True)),
            ("cache, cold", measure("ours", *common, cache_dir=cache, **CACHES)),
            ("cache, warm", measure("ours", *common, cache_dir=cache, **CACHES)),
        ]
    base = rows[0][1]
    print(f"arch={args.arch} device={args.device} steps={args.steps} (first {args.warmup} not timed)")
    print("run | img/s | vs no cache | step ms | data % | fwd+bwd % | wall s")
    print("--- | --- | --- | --- | --- | --- | ---")
    for name, m in rows:
        rate, base_rate = m["samples"] / m["train_s"], base["samples"] / base["train_s"]
        print(
            f"{name} | {rate:.1f} | {rate / base_rate:.2f}x | {1000 * m['step_s']:.1f} | "
            f"{100 * m['data_s'] / m['train_s']:.1f} | {100 * m['fwd_bwd_s'] / m['train_s']:.1f} | {m['wall_s']:.1f}"
        )


if __name__ == "__main__":
    main()
