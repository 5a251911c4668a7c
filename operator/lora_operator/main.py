"""lora-operator: run the LoRATrainingJob operator.

    lora-operator              # settings from LORA_OPERATOR_* variables (docs/operator.md)
    lora-operator --settings   # print the settings it would use and exit

Credentials: the pod's service account in a cluster, else $KUBECONFIG (or ~/.kube/config).
Exit codes: 0 after a clean shutdown, 1 when the leader lease was lost, 2 for invalid settings.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys

from . import __version__


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lora-operator",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--version", action="version", version=f"lora-operator {__version__}")
    parser.add_argument("--settings", action="store_true", help="print the resolved settings and exit")
    return parser.parse_args(argv)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if level != "DEBUG":  # kopf reports every handler run at INFO; our own log says what changed
        logging.getLogger("kopf").setLevel(logging.WARNING)


async def run(settings) -> int:
    import aiohttp
    import kopf

    from . import handlers
    from .kube import ApiClient
    from .leader import LeaderElector
    from .login import login
    from .observability import HttpServer, OperatorMetrics
    from .reconcile import Context

    log = logging.getLogger("lora_operator")
    loop = asyncio.get_running_loop()
    stop, lost, kopf_stop, kopf_ready = (asyncio.Event() for _ in range(4))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    api = ApiClient(login)
    metrics = OperatorMetrics()
    leading = {"yes": False}
    http = await HttpServer(
        metrics, settings.http_host, settings.http_port, ready=lambda: not leading["yes"] or kopf_ready.is_set()
    ).start()
    elector = None
    tasks: list[asyncio.Task] = []
    ctx = Context(settings, api, metrics)
    # the lease has a client of its own: its renewals never wait behind reconciles for a pooled connection
    lease_api = ApiClient(login)
    try:
        if settings.leader_election:
            elector = LeaderElector(
                lease_api,
                settings.lease_namespace,
                settings.lease_name,
                settings.identity,
                settings.lease_duration,
                settings.renew_interval,
            )
            if not await elector.acquire(stop):
                return 0
            tasks.append(asyncio.create_task(elector.hold(stop, lost)))
        leading["yes"] = True
        metrics.leader.set(1)

        async def relay() -> None:  # our stop or a lost lease stops kopf
            waits = [asyncio.create_task(stop.wait()), asyncio.create_task(lost.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            ctx.stopped.set()  # at once: kopf takes a while to stop, and a lost lease means another leads
            kopf_stop.set()

        tasks.append(asyncio.create_task(relay()))
        ctx.scraper = aiohttp.ClientSession()
        registry = handlers.register(kopf.OperatorRegistry())
        log.info(
            "lora-operator %s starting (%s)",
            __version__,
            "all namespaces" if settings.clusterwide else ", ".join(settings.watch_namespaces),
        )
        await kopf.operator(
            registry=registry,
            memo=kopf.Memo(ctx=ctx),
            standalone=True,
            clusterwide=settings.clusterwide,
            namespaces=list(settings.watch_namespaces),
            stop_flag=kopf_stop,
            ready_flag=kopf_ready,
        )
        if lost.is_set():
            log.error("lost the leader lease: exiting so that a standby takes over")
            return 1
        return 0
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        metrics.leader.set(0)
        if elector is not None:
            await elector.release()
        await ctx.close()
        await http.stop()
        await api.close()
        await lease_api.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as err:
        print(f"lora-operator: {err}", file=sys.stderr)
        return 2
    if args.settings:
        for f in dataclasses.fields(settings):
            print(f"{f.metadata['env']}={getattr(settings, f.name)}")
        return 0
    setup_logging(settings.log_level)
    try:
        return asyncio.run(run(settings))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
