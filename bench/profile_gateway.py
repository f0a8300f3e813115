"""Where the Gateway's own time goes (issue 20): py-spy samples the Gateway's processes while
closed-loop callers send chat completions through it to the fast upstream, compression off, as
`bench.overhead` does. Writes the sampled stacks (collapsed, py-spy's raw format) and a summary
of the functions that hold the most samples, inclusive and self, to bench/results/ (the stacks
gzipped: flamegraph.pl or speedscope read them).

    .venv/bin/python -m bench.profile_gateway                      # 16 callers, 1 k tokens, 20 s
    .venv/bin/python -m bench.profile_gateway --callers 1 --tokens 10000

py-spy (PyPI wheel) attaches with ptrace: run as root or with ptrace allowed.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path


from bench.load import machine, serving, work_folder
from bench.overhead import Cell, run_cell

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def gateway_pids(port: int) -> list[int]:
    """The `ccproxy serve` process on `port` (py-spy follows its workers with --subprocesses)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in args and b"--port" in args and str(port).encode() in args and any(b"ccproxy" in a for a in args):
            found.append(int(cmdline.parent.name))
    return found


def _frame(text: str) -> str:
    """`function (path:line)` -> `function path` (py-spy's paths are relative to sys.path)."""
    name, _, where = text.partition(" (")
    return f"{name} {where.rsplit(':', 1)[0]}" if where else name


def summarise(raw: str, top: int = 25) -> list[str]:
    """Sample shares from py-spy's collapsed stacks: ccproxy's own functions (inclusive: the
    time in them and what they call) and every function's self time."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    ours = [(frame, n) for frame, n in inclusive.most_common() if " ccproxy/" in frame][:top]
    lines = [f"{total:,} samples in all.", "", "ccproxy's functions, inclusive:", "",
             "| inclusive % | self % | function (file) |", "|---:|---:|---|"]
    lines += [f"| {100 * n / total:.1f} | {100 * own[frame] / total:.1f} | `{frame}` |" for frame, n in ours]
    lines += ["", "Most self time, any code:", "", "| self % | function (file) |", "|---:|---|"]
    lines += [f"| {100 * n / total:.1f} | `{frame}` |" for frame, n in own.most_common(top)]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    about = machine()
    load_before = os.getloadavg()
    with ExitStack() as cleanup:
        work = work_folder(cleanup, None, "ccproxy-profile-")
        stack = cleanup.enter_context(serving(work, work / "data"))
        port = int(stack.gateway.rsplit(":", 1)[1])
        [pid] = gateway_pids(port)
        headers = {"x-api-key": stack.api_key, "x-compression": "off"}
        url = f"{stack.gateway}/v1/chat/completions"
        warm = Cell("ccproxy", args.stream, args.callers, args.tokens)
        asyncio.run(run_cell(url, headers, warm, 2.0, 10_000))
        raw_path = work / "stacks.txt"
        spy_run = subprocess.Popen([
            spy, "record", "--pid", str(pid), "--subprocesses", "--format", "raw", "--rate", "250",
            "--duration", str(int(args.seconds)), "--nonblocking", "--output", str(raw_path),
        ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # py-spy attaches
        cell = Cell("ccproxy", args.stream, args.callers, args.tokens)
        asyncio.run(run_cell(url, headers, cell, args.seconds - 1.5, 1_000_000))
        _, spy_errors = spy_run.communicate(timeout=args.seconds + 60)
        if spy_run.returncode != 0 or not raw_path.exists():
            print(f"py-spy failed: {spy_errors[-2000:]}", file=sys.stderr)
            return 1
        raw = raw_path.read_text()
        load_after = os.getloadavg()
    name = f"gateway_profile_c{args.callers}_t{args.tokens}{'_stream' if args.stream else ''}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.txt.gz").write_bytes(gzip.compress(raw.encode(), mtime=0))
    header = [
        f"# Gateway profile: {args.callers} callers, {args.tokens:,}-token prompts, "
        f"{'streamed' if args.stream else 'whole answers'}",
        "",
        f"Command: `python -m bench.profile_gateway --callers {args.callers} --tokens {args.tokens}"
        f"{' --stream' if args.stream else ''}`. Run {started} on {about['cpu']} ({about['cores']} cores), "
        f"load average {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the end; {len(cell.times_ms)} requests "
        f"in {args.seconds - 1.5:.1f} s through the Gateway (compression off), {cell.failures} failed. py-spy "
        f"sampled every Gateway process at 250 Hz (idle threads excluded); shares are of all samples, "
        f"so the worker's event loop, its threads and the BentoML supervisor add up to 100 %. "
        f"Stacks (py-spy's raw format, gzip): `bench/results/{name}.txt.gz`.",
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(header + summarise(raw)) + "\n")
    print("\n".join(header + summarise(raw, 25)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
