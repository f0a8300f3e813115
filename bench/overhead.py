"""The Gateway's own cost (issue 20), the ai-gateway-bench way: the same requests through
ccproxy to a fast upstream and directly to that upstream, same run, compression off.

``bench.load.serving`` starts ``bench/fast_upstream.py`` (canned answers, no model), a Compressor
and a Gateway on loopback. For each concurrency (1, 16, 64 callers) and prompt size (100, 1 k,
10 k, 100 k tokens, ~4 characters each), closed-loop callers send chat completions for a fixed
time, first directly, then through the Gateway (``x-compression: off``): whole answers (time to
the last byte) and streams (time to the first content byte). Overhead at a percentile is the
Gateway's percentile minus the direct one. The Gateway's own ``x-ccproxy-overhead-ms`` header is
reported beside it. Callers, Gateway and upstream share this machine's cores, so at 16 and 64
callers the client's own work is part of every figure, on both sides.

    .venv/bin/python -m bench.overhead                 # ~8 min on 2 cores
    .venv/bin/python -m bench.overhead --seconds 2 --no-docs
    .venv/bin/python -m bench.overhead --replicas 2      # two Gateways behind haproxy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.load import MODEL, machine, percentile, publish, run_line, serving, work_folder
from harness.postgres import fresh_database

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
RESULTS_MD = ROOT / "bench" / "results" / "overhead.md"
MARKS = ("<!-- overhead:start -->", "<!-- overhead:end -->")
REPLICA_MARKS = ("<!-- overhead-replicas:start -->", "<!-- overhead-replicas:end -->")
CONCURRENCY = (1, 16, 64)
PROMPT_TOKENS = (100, 1_000, 10_000, 100_000)
GOALS = "p95 overhead ≤ 3 ms at 1 caller and ≤ 10 ms at 16, prompts up to 10 k tokens; streamed TTFT overhead ≤ 3 ms"


@dataclass
class Cell:
    target: str  # "direct" or "ccproxy"
    stream: bool
    concurrency: int
    prompt_tokens: int
    times_ms: list[float] = field(default_factory=list)
    header_ms: list[float] = field(default_factory=list)  # x-ccproxy-overhead-ms
    failures: int = 0


def body_for(prompt_tokens: int, stream: bool) -> dict[str, Any]:
    # ~4 characters a token, as the fast upstream counts (tiktoken finds a few fewer).
    text = ("the quick brown fox jumps over the lazy dog " * (prompt_tokens // 8 + 1))[: prompt_tokens * 4]
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    return body


async def _one(client: httpx.AsyncClient, url: str, payload: bytes, headers: dict[str, str], cell: Cell) -> None:
    started = time.perf_counter()
    try:
        if cell.stream:
            async with client.stream("POST", url, content=payload, headers=headers) as response:
                first = None
                async for line in response.aiter_lines():
                    if first is None and line.startswith("data: {") and _has_content(line[6:]):
                        first = time.perf_counter()
                if response.status_code != 200 or first is None:
                    cell.failures += 1
                    return
                elapsed = first - started
        else:
            response = await client.post(url, content=payload, headers=headers)
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                cell.failures += 1
                return
    except httpx.HTTPError:
        cell.failures += 1
        return
    cell.times_ms.append(elapsed * 1000)
    if "x-ccproxy-overhead-ms" in response.headers:
        cell.header_ms.append(float(response.headers["x-ccproxy-overhead-ms"]))


def _has_content(data: str) -> bool:
    choices = json.loads(data).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


async def run_cell(url: str, headers: dict[str, str], cell: Cell, seconds: float, max_requests: int) -> None:
    payload = httpx.Request("POST", url, json=body_for(cell.prompt_tokens, cell.stream)).content
    headers = {**headers, "content-type": "application/json"}
    limits = httpx.Limits(max_connections=cell.concurrency, max_keepalive_connections=cell.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        for _ in range(min(cell.concurrency, 4)):  # warm connections and the server's caches
            await _one(client, url, payload, headers, Cell(cell.target, cell.stream, 1, cell.prompt_tokens))
        deadline = time.perf_counter() + seconds
        sent = 0

        async def caller() -> None:
            nonlocal sent
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                await _one(client, url, payload, headers, cell)

        await asyncio.gather(*(caller() for _ in range(cell.concurrency)))


def _p(values: Sequence[float], q: float) -> float:
    return percentile(list(values), q / 100) if values else float("nan")


def table(cells: dict[tuple[str, bool, int, int], Cell], stream: bool) -> list[str]:
    what = "time to first content byte" if stream else "whole answer"
    lines = [
        "| callers | prompt tokens | direct p50 / p95 / p99 ms | ccproxy p50 / p95 / p99 ms | overhead p50 / p95 / p99 ms "
        "| x-ccproxy-overhead-ms p50 / p95 | requests | refused or failed |",
        "|---:|---:|---|---|---|---|---:|---:|",
    ]
    for concurrency in CONCURRENCY:
        for tokens in PROMPT_TOKENS:
            direct = cells[("direct", stream, concurrency, tokens)]
            ours = cells[("ccproxy", stream, concurrency, tokens)]
            d = [_p(direct.times_ms, q) for q in (50, 95, 99)]
            o = [_p(ours.times_ms, q) for q in (50, 95, 99)]
            h = [_p(ours.header_ms, q) for q in (50, 95)]
            failed = ours.failures + direct.failures
            lines.append(
                f"| {concurrency} | {tokens:,} | {' / '.join(f'{x:.1f}' for x in d)} | {' / '.join(f'{x:.1f}' for x in o)} | "
                f"{' / '.join(f'{b - a:+.1f}' for a, b in zip(d, o))} | {' / '.join(f'{x:.2f}' for x in h)} | "
                f"{len(ours.times_ms):,} | {failed} |"
            )
    return [f"**{what.capitalize()}** ({'streamed' if stream else 'non-streamed'})", "", *lines]


async def measure(stack: Any, seconds: float, max_requests: int) -> dict[tuple[str, bool, int, int], Cell]:
    cells: dict[tuple[str, bool, int, int], Cell] = {}
    targets = {
        "direct": (f"{stack.upstream}/v1/chat/completions", {"authorization": "Bearer sk-fast-upstream"}),
        "ccproxy": (f"{stack.gateway}/v1/chat/completions", {"x-api-key": stack.api_key, "x-compression": "off"}),
    }
    for stream in (False, True):
        for concurrency in CONCURRENCY:
            for tokens in PROMPT_TOKENS:
                for target, (url, headers) in targets.items():
                    cell = Cell(target, stream, concurrency, tokens)
                    await run_cell(url, headers, cell, seconds, max_requests)
                    cells[(target, stream, concurrency, tokens)] = cell
                print(f"overhead: stream={stream} callers={concurrency} tokens={tokens}: "
                      f"{len(cells[('ccproxy', stream, concurrency, tokens)].times_ms)} through ccproxy", file=sys.stderr,
                      flush=True)
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per cell and target")
    parser.add_argument("--max-requests", type=int, default=400, help="per cell and target")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    parser.add_argument("--replicas", type=int, default=1,
                        help="Gateways behind haproxy (round robin, one PostgreSQL database); 1: the Gateway alone")
    options = parser.parse_args(argv)
    command = "python -m bench.overhead " + shlex.join(argv if argv is not None else sys.argv[1:])
    load_start = os.getloadavg()
    started = time.perf_counter()
    with ExitStack() as cleanup:
        work = work_folder(cleanup, None, "ccproxy-overhead-")
        (work / "data").mkdir(exist_ok=True)
        database_url = cleanup.enter_context(fresh_database("ccproxy_overhead")) if options.replicas > 1 else None
        stack = cleanup.enter_context(serving(work, work / "data", database_url, options.replicas))
        cells = asyncio.run(measure(stack, options.seconds, options.max_requests))
    marks = MARKS if options.replicas == 1 else REPLICA_MARKS
    title = (
        "## Gateway overhead: through ccproxy minus direct" if options.replicas == 1
        else f"## Gateway overhead: {options.replicas} replicas behind haproxy"
    )
    through = (
        "the Gateway (`ccproxy serve`, default workers, compression off by header, usage recorded)"
        if options.replicas == 1 else
        f"{options.replicas} Gateways (`ccproxy serve` each, default workers, one PostgreSQL database, compression "
        "off by header, usage recorded) behind Debian's haproxy (round robin, `harness/servers.py`'s config)"
    )
    lines = [
        marks[0],
        title,
        "",
        run_line(command, f"{machine()['cpu']}, {os.cpu_count()} cores", (time.perf_counter() - started) / 60,
                 (load_start[0], os.getloadavg()[0])),
        "",
        "The fast upstream (`bench/fast_upstream.py`, canned answers) alone, then the same requests through "
        f"{through}, "
        f"closed-loop callers for {options.seconds:g} s (at most {options.max_requests} requests) per cell and "
        "target, after a warm-up. Overhead = ccproxy's percentile − the direct percentile, same run. "
        "Callers, Gateways, load balancer and upstream share the machine's cores. Goals (issue 20): " + GOALS + ".",
        "",
        *table(cells, stream=False),
        "",
        *table(cells, stream=True),
        "",
        marks[1],
        "",
    ]
    results = RESULTS_MD if options.replicas == 1 else RESULTS_MD.with_name(f"overhead_{options.replicas}_replicas.md")
    publish("\n".join(lines), results, None if options.no_docs else BENCHMARKS_MD, marks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
