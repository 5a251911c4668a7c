"""lora-train: train a LoRA from a flat YAML config or a LoRATrainingJob manifest.

    lora-train --config cfg.yaml [--set key=value ...]
    lora-train --config job.yaml          # a LoRATrainingJob manifest, run locally
    lora-train --config cfg.yaml --print-config
    lora-train --config cfg.yaml --nproc-per-node 4   # several processes (elastic.py)

Exit codes: docs/architecture.md, "Exit codes" (0 ok, 2 config, 3 dataset, 4 model, 5 diverged, ... 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from . import elastic
from .errors import ExitCode, Interrupted, TrainError
from .logs import setup_logging

log = logging.getLogger("lora_trainer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lora-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", required=True, help="flat YAML config or LoRATrainingJob manifest")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable); values are YAML",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    elastic.add_flags(parser)
    return parser.parse_args(argv)


def install_sigterm(stop: threading.Event) -> None:
    def handler(signum, frame):
        log.warning("SIGTERM: writing a checkpoint at the end of this step, then exiting")
        stop.set()

    signal.signal(signal.SIGTERM, handler)


def list_outputs(folder: Path) -> str:
    lines = [f"{folder}/"]
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        lines.append(f"  {path.relative_to(folder)}  ({path.stat().st_size:,} bytes)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.quiet)
    from .redaction import redact
    from .termination import TerminationReport

    report = TerminationReport()  # written on every exit: docs/trainer-operator.md
    try:
        from .config import config_to_yaml, load_config

        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(config_to_yaml(cfg), end="")
            return ExitCode.OK
        report.configure(cfg)
        if elastic.wanted(args):  # the config is valid: start the training processes
            return elastic.run(args, sys.argv[1:] if argv is None else list(argv), report)
        return train(cfg, report)
    except TrainError as err:
        log.error("%s (exit %d, %s)", redact(str(err)), err.exit_code, err.reason)
        return report.failed(err)
    except KeyboardInterrupt:
        log.error("interrupted")
        return report.failed(Interrupted("interrupted"))
    except BaseException as err:
        report.failed(err)  # a crash: exit 1 with its traceback, and a termination message
        raise
    finally:
        report.write()
        elastic.end_launch_if_permanent(report)


def train(cfg, report=None) -> int:
    from .launch import StopSignal, launch
    from .termination import TerminationReport

    report = report or TerminationReport()
    stop = StopSignal()
    install_sigterm(stop)
    summary = launch(cfg, stop, report)
    if summary.artifacts:  # the main process wrote the outputs
        log.info("done: step %d, loss %.4f; outputs:", summary.step, summary.loss if summary.loss is not None else 0.0)
        print(list_outputs(Path(report.outputs.local_output_dir)))
        if report.outputs.local_output_dir != cfg.output_dir:
            log.info("uploaded to %s", cfg.output_dir)
    return report.succeeded()


if __name__ == "__main__":
    sys.exit(main())
