"""The operator's scrape of a trainer's /metrics against hostile pages served on 127.0.0.1: compressed
bombs, oversized pages, drips and absurd values end in no sample or a refusal, in bounded time and memory,
and never hold the event loop (operator/lora_operator/progress.py)."""

from __future__ import annotations

import asyncio
import functools
import gzip
import resource
import time

import aiohttp
import pytest
from aiohttp import web

from lora_operator.progress import METRICS_BYTE_LIMIT, parse_metrics, scrape

PAGE = """# TYPE lora_train_step gauge
lora_train_step 7
# TYPE lora_train_total_steps gauge
lora_train_total_steps 100
# TYPE lora_train_loss gauge
lora_train_loss 0.25
# TYPE lora_train_last_checkpoint_step gauge
lora_train_last_checkpoint_step{uri="s3://b/out/checkpoints/state_step_5"} 5
"""


def padding(size: int) -> str:
    return "".join(f"# HELP filler_{i} {'x' * 80}\n" for i in range(size // 90))


@functools.cache
def gzip_bomb() -> bytes:
    """0.2 MiB on the wire, 200 MiB of metrics page once decompressed."""
    return gzip.compress(b"# " + b"x" * (200 * 2**20) + b"\n" + PAGE.encode(), compresslevel=6)


async def hostile(request: web.Request) -> web.StreamResponse:
    kind = request.match_info["kind"]
    if kind == "plain":
        return web.Response(text=PAGE)
    if kind == "gzip-bomb":
        return web.Response(body=gzip_bomb(), headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})
    if kind == "huge":
        return web.Response(text=padding(4 * METRICS_BYTE_LIMIT) + PAGE)
    if kind == "drip":  # a byte a second, forever
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(60):
            await response.write(b"#")
            await asyncio.sleep(1)
        return response
    if kind == "absurd":
        return web.Response(
            text="lora_train_step 1e300\nlora_train_total_steps -5\nlora_train_loss NaN\n"
            f'lora_train_last_checkpoint_step{{uri="{"u" * 100_000}"}} 3\n'
        )
    raise web.HTTPNotFound()


async def heartbeat(ticks: list[float]) -> None:
    """Ticks every 0.1 s while the event loop is free."""
    while True:
        await asyncio.sleep(0.1)
        ticks.append(time.monotonic())


def scrape_from(kind: str, timeout: float = 2.0):
    """Serves one hostile page on 127.0.0.1, scrapes it; returns (result, seconds, heartbeat ticks)."""

    async def main():
        app = web.Application()
        app.router.add_get("/{kind}/metrics", hostile)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        ticks: list[float] = []
        beat = asyncio.create_task(heartbeat(ticks))
        try:
            async with aiohttp.ClientSession() as session:
                started = time.monotonic()
                result = await scrape(session, f"http://127.0.0.1:{port}/{kind}/metrics", timeout)
                return result, time.monotonic() - started, ticks
        finally:
            beat.cancel()
            await runner.cleanup()

    return asyncio.run(main())


def test_a_plain_page_is_read():
    result, _, _ = scrape_from("plain")
    assert result.refused is None
    assert (result.sample.step, result.sample.total_steps, result.sample.loss) == (7, 100, 0.25)
    assert result.sample.checkpoint_uri == "s3://b/out/checkpoints/state_step_5"


@pytest.mark.parametrize(
    "kind, refusal",
    [("gzip-bomb", "Content-Encoding gzip"), ("huge", f"more than {METRICS_BYTE_LIMIT} bytes")],
)
def test_bombs_and_oversized_pages_are_refused_cheaply(kind, refusal):
    gzip_bomb()  # built before measuring
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result, seconds, _ = scrape_from(kind)
    assert result.sample is None and refusal in result.refused
    assert seconds < 5
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 64, f"the scrape grew the process by {grown_mib:.0f} MiB"


def test_a_drip_ends_at_the_timeout_and_the_loop_keeps_running():
    result, seconds, ticks = scrape_from("drip", timeout=1.5)
    assert result.sample is None and result.refused is None
    assert seconds < 4
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) >= 8 and max(gaps) < 1.0, gaps


def test_absurd_values_are_dropped():
    result, _, _ = scrape_from("absurd")
    assert result.sample is not None  # the one sane sample, the checkpoint step, stays
    assert (result.sample.step, result.sample.total_steps, result.sample.loss) == (None, None, None)
    assert result.sample.checkpoint_step == 3 and result.sample.checkpoint_uri is None


def test_parsing_a_page_at_the_limit_is_quick():
    text = padding(METRICS_BYTE_LIMIT - len(PAGE)) + PAGE
    started = time.monotonic()
    sample = parse_metrics(text)
    assert sample.step == 7 and time.monotonic() - started < 2
