"""Answer parity: does a reader answer the same with ccproxy's compressed context as with the full one?

Each question goes through a real ccproxy Gateway twice (official ``openai`` client, greedy):
once with ``X-Compression: off``, once per ratio with ``X-Compression-Ratio``. The reader is
llama.cpp's OpenAI server on the embedded SmolLM2-135M-Instruct GGUF, or any OpenAI-compatible
server given with ``--upstream``. Items: NQ multi-document questions from the evaluation part,
20 documents with hard distractors (``nqdata/items.py``), the same items as the compressor benchmark.

Reported per ratio: best-subspan exact match for both arms, their paired difference with a 95 %
bootstrap interval, the answers' Levenshtein distances, the achieved compression ratio from the
response headers, and whether the header counts agree with the upstream's own usage.

Writes ``bench/results/parity_items.json``, ``bench/results/parity.md``, ``docs/parity_answers.png`` and
the section between ``<!-- parity:start -->`` and ``<!-- parity:end -->`` of ``docs/BENCHMARKS.md``.
Answers are saved as they come and reused by a rerun with the same settings, so ``--max-minutes``
splits a long run (~30 s per item and ratio on 2 CPU cores) into chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.load import BENCHMARKS_MD, machine, work_folder, write_section
from bench.stats import PairedDifference, levenshtein, paired_bootstrap, share_within
from harness.servers import REPO, bentoml_serve, create_key, free_port, llama_cpp_server, running
from nqdata.items import Item, contains_answer, hard_distractor_items, load_records

RESULTS = REPO / "bench" / "results"
START_MARK, END_MARK = "<!-- parity:start -->", "<!-- parity:end -->"
EMBEDDED_READER = "smollm2-upstream"  # the alias harness.servers.llama_cpp_server serves


# --- the servers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    gateway: str  # base URL without /v1
    api_key: str  # a ccproxy key, made with the CLI


@contextmanager
def serving(work: Path, upstream: str | None, upstream_key: str | None, gateway_env: Mapping[str, str]) -> Iterator[Stack]:
    """llama.cpp (unless ``upstream`` is given) and a Gateway in front of it, on loopback.

    The Gateway runs its Compressor in-process with the shipped defaults (scoring ``both``),
    keeps accounts and usage in SQLite, and holds the upstream key, so callers send only their
    ccproxy key, as in production.
    """
    quiet = {"OMP_WAIT_POLICY": "PASSIVE", "BENTOML_DO_NOT_TRACK": "true"}
    with ExitStack() as stack:
        if upstream is None:
            from ccproxy.embedded import embedded_gguf_path

            port = free_port()
            upstream = f"http://127.0.0.1:{port}/v1"
            upstream_key = upstream_key or f"sk-parity-{secrets.token_hex(8)}"
            # Flash attention: the prompt (~2.6 k tokens) costs ~20 % less on this CPU; one thread
            # (the server's default on 2 cores), as a second one only waits for busy cores.
            command = [*llama_cpp_server(port, embedded_gguf_path(), api_key=upstream_key), "--flash_attn", "true"]
            stack.enter_context(running(
                command,
                probe_url=f"{upstream}/models", log=work / "llama.log", env=quiet,
                ok_statuses=frozenset({200, 401}),
            ))
            log(f"llama.cpp server on {upstream}")
        gateway_port = free_port()
        gateway = f"http://127.0.0.1:{gateway_port}"
        env = {
            **quiet,
            "CCPROXY_UPSTREAM_URL": upstream,
            "CCPROXY_DATA_DIR": str(work / "data"),
            "CCPROXY_COMPRESSOR_GPUS": "0",
            **({"CCPROXY_UPSTREAM_API_KEY": upstream_key} if upstream_key else {}),
            **gateway_env,
        }
        api_key = create_key(env, "parity")
        stack.enter_context(running(
            bentoml_serve(gateway_port), probe_url=f"{gateway}/readyz", log=work / "gateway.log", env=env, timeout_s=300,
        ))
        log(f"Gateway on {gateway}")
        yield Stack(gateway, api_key)


# --- asking -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int | None  # the upstream's usage.prompt_tokens
    completion_tokens: int | None
    compression: str  # x-compression: compressed, disabled, failed, …
    tokens_before: int
    tokens_after: int
    tokens_saved: int
    seconds: float


def ask(client: Any, model: str, item: Item, headers: Mapping[str, str], max_tokens: int) -> Answer:
    started = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=item.messages(), max_tokens=max_tokens, temperature=0, extra_headers=dict(headers),
    )
    seconds = time.perf_counter() - started
    completion = raw.parse()
    usage = completion.usage
    return Answer(
        text=completion.choices[0].message.content or "",
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        compression=raw.headers.get("x-compression", ""),
        tokens_before=int(raw.headers["x-tokens-before"]),
        tokens_after=int(raw.headers["x-tokens-after"]),
        tokens_saved=int(raw.headers["x-tokens-saved"]),
        seconds=round(seconds, 3),
    )


def new_row(item: Item) -> dict[str, Any]:
    return {
        "line": item.record.line,
        "question": item.question,
        "answers": list(item.record.answers),
        "gold_index": item.gold_index,
        "full": None,
        "compressed": {},
    }


def run_items(
    stack: Stack,
    model: str,
    items: Sequence[Item],
    ratios: Sequence[str],
    max_tokens: int,
    rows: dict[int, dict[str, Any]],
    save: Callable[[], None],
    deadline: float,
) -> None:
    """Fill ``rows`` (by NQ line): the full answer once per item, then one compressed answer per
    ratio; what ``rows`` already holds is reused. Saves after every item and stops at
    ``deadline`` (``time.monotonic()``), so a long run can be done in chunks."""
    import openai

    client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=stack.api_key, max_retries=0, timeout=300)
    started, asked = time.monotonic(), 0
    for number, item in enumerate(items, start=1):
        if time.monotonic() > deadline:
            log(f"time is up after {number - 1} items; rerun the same command to go on")
            return
        row = rows.setdefault(item.record.line, new_row(item))
        if row["full"] is None:
            row["full"] = asdict(ask(client, model, item, {"X-Compression": "off"}, max_tokens))
            asked += 1
        for ratio in ratios:
            if ratio not in row["compressed"]:
                row["compressed"][ratio] = asdict(ask(client, model, item, {"X-Compression-Ratio": ratio}, max_tokens))
                asked += 1
        save()
        if number % 10 == 0 or number == len(items):
            log(f"{number}/{len(items)} items, {asked} requests in {(time.monotonic() - started) / 60:.1f} min")


def complete(rows: Sequence[Mapping[str, Any]], ratios: Sequence[str]) -> list[Mapping[str, Any]]:
    """The rows that hold the full answer and every ratio's."""
    return [r for r in rows if r["full"] and all(ratio in r["compressed"] for ratio in ratios)]


# --- the figures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RatioSummary:
    ratio: str
    n: int
    compressed_outcomes: int  # answers the Gateway actually compressed (others failed open)
    em_full: float
    em_compressed: float
    difference: PairedDifference
    identical: float  # share of answers with Levenshtein distance 0
    within_5: float
    within_20: float
    median_distance: float
    kept_mean: float  # mean over items of tokens after / tokens before
    kept_total: float  # sum of after / sum of before
    header_after_is_upstream: int  # items whose x-tokens-after == the upstream's prompt_tokens
    header_sum_holds: int  # items whose before == after + saved
    before_is_full_bill: int  # items whose compressed x-tokens-before == the full request's prompt_tokens
    before_max_gap: int
    seconds_full: float
    seconds_compressed: float


def answer_distance(full: Mapping[str, Any], compressed: Mapping[str, Any]) -> int:
    # Leading/trailing whitespace is formatting, not a different answer.
    return levenshtein(full["text"].strip(), compressed["text"].strip())


def headers_consistent(answer: Mapping[str, Any]) -> tuple[bool, bool]:
    """(x-tokens-after is the upstream's usage.prompt_tokens, before == after + saved)."""
    after_is_upstream = answer["prompt_tokens"] is not None and answer["tokens_after"] == answer["prompt_tokens"]
    return after_is_upstream, answer["tokens_before"] == answer["tokens_after"] + answer["tokens_saved"]


def summarise(rows: Sequence[Mapping[str, Any]], ratio: str, *, seed: int = 0) -> RatioSummary:
    fulls = [row["full"] for row in rows]
    compressed = [row["compressed"][ratio] for row in rows]
    em_full = [float(contains_answer(a["text"], tuple(row["answers"]))) for a, row in zip(fulls, rows)]
    em_compressed = [float(contains_answer(a["text"], tuple(row["answers"]))) for a, row in zip(compressed, rows)]
    distances = [answer_distance(f, c) for f, c in zip(fulls, compressed)]
    kept = [c["tokens_after"] / c["tokens_before"] for c in compressed]
    # The full request's prompt_tokens is what the upstream bills for the original prompt; the
    # compressed answer's x-tokens-before claims to be that same number.
    gaps = [abs(c["tokens_before"] - f["prompt_tokens"]) for f, c in zip(fulls, compressed) if f["prompt_tokens"] is not None]
    checks = [headers_consistent(a) for a in compressed]
    return RatioSummary(
        ratio=ratio,
        n=len(rows),
        compressed_outcomes=sum(c["compression"] == "compressed" for c in compressed),
        em_full=statistics.fmean(em_full),
        em_compressed=statistics.fmean(em_compressed),
        difference=paired_bootstrap(em_full, em_compressed, seed=seed),
        identical=share_within(distances, 0),
        within_5=share_within(distances, 5),
        within_20=share_within(distances, 20),
        median_distance=statistics.median(distances),
        kept_mean=statistics.fmean(kept),
        kept_total=sum(c["tokens_after"] for c in compressed) / sum(c["tokens_before"] for c in compressed),
        header_after_is_upstream=sum(after for after, _ in checks),
        header_sum_holds=sum(total for _, total in checks),
        before_is_full_bill=sum(gap == 0 for gap in gaps),
        before_max_gap=max(gaps, default=0),
        seconds_full=statistics.fmean(f["seconds"] for f in fulls),
        seconds_compressed=statistics.fmean(c["seconds"] for c in compressed),
    )


def full_headers_consistent(rows: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """For the uncompressed answers: (after == upstream prompt_tokens, before == after and saved == 0)."""
    fulls = [row["full"] for row in rows]
    return (
        sum(headers_consistent(a)[0] for a in fulls),
        sum(a["tokens_before"] == a["tokens_after"] and a["tokens_saved"] == 0 for a in fulls),
    )


def parity_holds(summary: RatioSummary) -> bool:
    """The headline's test: no measurable EM loss (the interval reaches 0 or lies above it)."""
    return summary.difference.high >= 0.0


def em_verdict(summary: RatioSummary) -> str:
    """What the paired interval says: a gain or a loss only where it excludes 0."""
    if summary.difference.low > 0.0:
        return "a measurable EM gain"
    if summary.difference.high < 0.0:
        return "a measurable EM loss"
    return "no measurable EM difference"


# --- the report -------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _signed(value: float) -> str:
    return f"{100 * value:+.1f}"


def table(summaries: Sequence[RatioSummary]) -> str:
    lines = [
        "| ratio asked | N | kept tokens (mean / total) | EM full | EM compressed | difference (pts) | 95 % CI (pts) "
        "| identical answers | Levenshtein ≤ 5 | ≤ 20 | median distance |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.ratio} | {s.n} | {_pct(s.kept_mean)} / {_pct(s.kept_total)} | {_pct(s.em_full)} | {_pct(s.em_compressed)} "
            f"| {_signed(s.difference.mean)} | [{_signed(s.difference.low)}, {_signed(s.difference.high)}] "
            f"| {_pct(s.identical)} | {_pct(s.within_5)} | {_pct(s.within_20)} | {s.median_distance:g} |"
        )
    return "\n".join(lines)


def identity_table(rows: Sequence[Mapping[str, Any]], summaries: Sequence[RatioSummary]) -> str:
    n = len(rows)
    full_after, full_zero = full_headers_consistent(rows)
    lines = [
        "| request | x-tokens-after = upstream prompt_tokens | before = after + saved | before = full request's prompt_tokens | Gateway outcome `compressed` | s per request |",
        "|---|---:|---:|---:|---:|---:|",
        f"| `X-Compression: off` | {full_after}/{n} | {full_zero}/{n} (saved 0) | — | — "
        f"| {statistics.fmean(r['full']['seconds'] for r in rows):.2f} |",
    ]
    for s in summaries:
        lines.append(
            f"| ratio {s.ratio} | {s.header_after_is_upstream}/{n} | {s.header_sum_holds}/{n} "
            f"| {s.before_is_full_bill}/{n} (max gap {s.before_max_gap}) | {s.compressed_outcomes}/{n} | {s.seconds_compressed:.2f} |"
        )
    return "\n".join(lines)


def headline(summaries: Sequence[RatioSummary]) -> str:
    parts = []
    for s in summaries:
        parts.append(
            f"At ratio {s.ratio} ({_pct(1 - s.kept_total)} of the prompt tokens dropped) {em_verdict(s)}: "
            f"EM {_pct(s.em_full)} → {_pct(s.em_compressed)}, difference {_signed(s.difference.mean)} pts, "
            f"95 % CI [{_signed(s.difference.low)}, {_signed(s.difference.high)}]; "
            f"{_pct(s.within_5)} of the answers within Levenshtein distance 5 of the full-context answer "
            f"({_pct(s.identical)} identical)"
        )
    holding = [s.ratio for s in summaries if parity_holds(s)]
    where = (
        f"No measurable EM loss (the CI of the difference reaches 0 or lies above it) at ratio {', '.join(holding)}"
        if holding else "A measurable EM loss at every ratio measured"
    )
    # The seed's own bar: every compressed answer within Levenshtein distance 5 of the full one.
    seed_bar = [s.ratio for s in summaries if s.within_5 == 1.0]
    seed = (
        f"The seed's bar (every answer within Levenshtein distance 5) holds at ratio {', '.join(seed_bar)}"
        if seed_bar else "The seed's bar (every answer within Levenshtein distance 5) holds at none of the ratios measured"
    )
    return f"**{where}** (N = {summaries[0].n}). **{seed}.** " + ". ".join(parts) + "."


def markdown(rows: Sequence[Mapping[str, Any]], summaries: Sequence[RatioSummary], info: Mapping[str, str]) -> str:
    return "\n".join([
        START_MARK,
        "## Answer parity: the same reader, full vs compressed context",
        "",
        f"`{info['command']}` (`make parity` runs the defaults: 200 items, ratios 0.5 and 0.2; the `bench` "
        f"extra installed). {info['reader']} answers "
        f"each question through a real ccproxy Gateway (`bentoml serve service:Gateway`, SQLite usage, a key "
        "made with the CLI, the shipped Compressor defaults: scoring `both`), with the official `openai` "
        f"client, greedy (`temperature=0`, `max_tokens={info['max_tokens']}`): once with `X-Compression: off` "
        "(computed once, reused for every ratio) and once per ratio with `X-Compression-Ratio`. Items: the "
        f"first {len(rows)} of the {info['planned']} NQ evaluation-part items that the compressor benchmark above "
        f"draws (seed {info['seed']}; {info['n_documents']} documents, hard distractors, ~2.6 k prompt tokens). "
        "llama.cpp runs one thread with flash attention. EM = best-subspan exact match "
        "(a normalised gold answer inside the normalised answer); difference = compressed − full, paired, "
        "95 % percentile bootstrap over items (10,000 resamples, seeded; `bench/stats.py`). Levenshtein: "
        "characters, between the full-context and the compressed answer (whitespace-trimmed). Kept tokens: "
        "`x-tokens-after` / `x-tokens-before` of the compressed answers, per item then averaged, and in total. "
        "Per-item answers: `bench/results/parity_items.json`.",
        "",
        f"Run {info['date']} on {info['cpu']} ({info['cores']} cores, 1-minute load average "
        f"{info.get('load_avg_1min', 'not recorded')} at the end), "
        f"torch {info['torch']}, bentoml {info['bentoml']}; {info['minutes']} min wall in {info['chunks']} chunk(s)."
        + ("" if len(rows) >= int(info["planned"]) else
           f" **Incomplete: {len(rows)} of the planned {info['planned']} items are answered so far** "
           "(rerun the command: stored answers are reused)."),
        "",
        headline(summaries),
        "",
        table(summaries),
        "",
        "Token counts in the headers against the upstream's own `usage` (header identity):",
        "",
        identity_table(rows, summaries),
        "",
        "![answer parity](parity_answers.png)",
        "",
        info.get("notes", "").strip(),
        END_MARK,
    ]) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], summaries: Sequence[RatioSummary], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = ["full"] + [f"ratio {s.ratio}" for s in summaries]
    values = [summaries[0].em_full] + [s.em_compressed for s in summaries]
    left.bar(labels, values, color=["#555555"] + ["#1f77b4"] * len(summaries))
    for x, s in enumerate(summaries, start=1):
        # The paired CI of the difference, drawn around the full arm's EM.
        low, high = s.em_full + s.difference.low, s.em_full + s.difference.high
        left.errorbar(x, s.em_compressed, yerr=[[s.em_compressed - low], [high - s.em_compressed]], color="black", capsize=4)
    left.set_ylabel("best-subspan exact match")
    left.set_title(f"EM, N = {summaries[0].n} (bars: paired 95 % CI)")
    tops = values + [s.em_full + s.difference.high for s in summaries]
    left.set_ylim(0, min(1.0, max(tops) + 0.1))
    cap = 120
    for s in summaries:
        distances = sorted(min(answer_distance(r["full"], r["compressed"][s.ratio]), cap) for r in rows)
        shares = [(i + 1) / len(distances) for i in range(len(distances))]
        right.step([0, *distances], [0.0, *shares], where="post", label=f"ratio {s.ratio}")
    right.axvline(5, color="grey", linestyle="--", linewidth=1)
    right.set_xlabel(f"Levenshtein distance to the full-context answer (capped at {cap})")
    right.set_ylabel("share of answers ≤ distance")
    right.set_ylim(0, 1.02)
    right.legend(loc="lower right")
    right.set_title("answer distance, compressed vs full")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def log(message: str) -> None:
    print(f"parity: {message}", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-items", type=int, default=200)
    parser.add_argument("--n-documents", type=int, default=20)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.2])
    parser.add_argument("--seed", type=int, default=0, help="item draw (as the compressor benchmark) and bootstrap")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--upstream", help="an OpenAI-compatible base URL (…/v1) to read with, instead of llama.cpp")
    parser.add_argument("--upstream-key", default=os.environ.get("PARITY_UPSTREAM_KEY"),
                        help="the upstream's API key (default: $PARITY_UPSTREAM_KEY), held by the Gateway")
    parser.add_argument("--model", default=EMBEDDED_READER, help="model name sent to the upstream")
    parser.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra Gateway setting, e.g. CCPROXY_MODEL_TOKENIZERS=… for another reader")
    parser.add_argument("--max-minutes", type=float, default=0,
                        help="stop asking after this long (0: no limit); answers so far are kept and a rerun goes on")
    parser.add_argument("--fresh", action="store_true", help="ignore the answers stored in --json")
    parser.add_argument("--report-only", action="store_true", help="no servers: report the answers stored in --json")
    parser.add_argument("--json", type=Path, default=RESULTS / "parity_items.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "parity.md")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "parity_answers.png")
    parser.add_argument("--docs", type=Path, default=BENCHMARKS_MD)
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/BENCHMARKS.md")
    parser.add_argument("--keep", type=Path, help="keep the server logs in this folder")
    return parser.parse_args(argv)


def ratio_key(ratio: float) -> str:
    return f"{ratio:g}"  # the header's value and the JSON key: "0.5", "0.2"


def load_stored(path: Path, settings: Mapping[str, Any]) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Answers (by NQ line) and run history from an earlier run with the same settings."""
    if not path.exists():
        return {}, []
    stored = json.loads(path.read_text())
    if stored["info"].get("settings") != dict(settings):
        log(f"{path} holds answers for other settings ({stored['info'].get('settings')}); starting afresh")
        return {}, []
    return {int(row["line"]): row for row in stored["items"]}, list(stored["info"].get("runs", []))


def write_json(path: Path, info: Mapping[str, Any], rows: Mapping[int, Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps({"info": info, "items": list(rows.values())}, indent=1, ensure_ascii=False) + "\n")
    partial.replace(path)  # a run killed mid-write leaves the last good file


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ratios = [ratio_key(r) for r in args.ratios]
    command = " ".join(["python -m bench.parity", *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    reader = "embedded" if args.upstream is None else args.upstream
    # Answers are reusable only when asked the same way; the items depend on the seed and size.
    settings = {"reader": reader, "model": args.model, "max_tokens": args.max_tokens,
                "n_documents": args.n_documents, "seed": args.seed}
    rows, runs = ({}, []) if args.fresh else load_stored(args.json, settings)
    info: dict[str, Any] = {"settings": settings, "runs": runs}
    if not args.report_only:
        started = time.monotonic()
        deadline = started + args.max_minutes * 60 if args.max_minutes else float("inf")
        items = hard_distractor_items(load_records("eval"), args.n_documents, n_items=args.n_items, seed=args.seed)
        # Item order first (rows stored by a longer run follow), so "the first N" is well defined.
        rows = {item.record.line: rows.get(item.record.line) or new_row(item) for item in items} | rows
        todo = len(items) - len(complete([rows[item.record.line] for item in items], ratios))
        log(f"{len(items)} items, {todo} still to answer (full once, then ratios {', '.join(ratios)})")
        if todo:
            with ExitStack() as cleanup:
                work = work_folder(cleanup, args.keep, "ccproxy-parity-")
                gateway_env = dict(pair.split("=", 1) for pair in args.gateway_env)
                stack = cleanup.enter_context(serving(work, args.upstream, args.upstream_key, gateway_env))
                run_items(stack, args.model, items, ratios, args.max_tokens, rows,
                          lambda: write_json(args.json, info, rows), deadline)
            runs.append({**machine(), "command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                         "minutes": round((time.monotonic() - started) / 60, 1), "load_avg_1min": round(os.getloadavg()[0], 1)})
            write_json(args.json, info, rows)
            log(f"wrote {args.json}")
    done = complete(list(rows.values())[: args.n_items], ratios)
    if not done:
        log("no item has every answer yet")
        return 1
    summaries = [summarise(done, ratio, seed=args.seed) for ratio in ratios]
    report_info = {
        **(runs[-1] if runs else machine()),
        "command": "python -m bench.parity" + ("" if ratios == ["0.5", "0.2"] else " --ratios " + " ".join(ratios)),
        "reader": "SmolLM2-135M-Instruct (the embedded GGUF, served by llama.cpp's OpenAI server)"
        if args.upstream is None else f"`{args.model}` at {args.upstream}",
        "planned": str(args.n_items),
        "minutes": f"{sum(run['minutes'] for run in runs):.0f}",
        "chunks": str(len(runs)),
        "seed": str(args.seed),
        "n_documents": str(args.n_documents),
        "max_tokens": str(args.max_tokens),
        "notes": NOTES_FILE.read_text() if NOTES_FILE.exists() else "",
    }
    section = markdown(done, summaries, report_info)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(section.replace(START_MARK + "\n", "").replace(END_MARK + "\n", ""))
    plot(done, summaries, args.plot)
    log(f"wrote {args.out} and {args.plot}")
    print(headline(summaries))
    print(table(summaries))
    print(identity_table(done, summaries))
    if not args.no_docs:
        write_section(section, args.docs, (START_MARK, END_MARK))
        log(f"wrote the parity section of {args.docs}")
    return 0


# Reading notes written after looking at the numbers; kept beside the results, so a rerun
# keeps them, and shown under the tables.
NOTES_FILE = RESULTS / "parity_notes.md"


if __name__ == "__main__":
    raise SystemExit(main())
