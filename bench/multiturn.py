"""Multi-turn chats through the product's compression: kept rate, tokens, prompt-cache hits, bill.

Synthetic conversations from the EVALUATION part of the NQ file (``nqdata/items.py``): each turn a
user message with a few retrieved documents (the gold passage and hard distractors, in random
order) and the question last, answered by a canned assistant reply (the gold answer). The final
turn asks one earlier turn's question again, so it depends on that turn alone. Every request
resends the whole history, as chat clients do.

Three arms see the same requests: ``full`` (no ccproxy), ``rescore`` (the whole history decided
again against each new question: the policy before ``CCPROXY_COMPRESSION_HISTORY``) and
``stable`` (each turn decided once, append-only; ``ccproxy.compression.history``). Compression
is the product's own code in-process: ``ContextCompressor`` with ``load_scorer`` (fusion
``both`` by default), server defaults (ratio 0.5, threshold 1,000 tokens), tokens counted with
tiktoken's o200k as for gpt-4o. The bill comes from ``bench/cost_model.py``: OpenAI's prompt
cache rule over the rendered prompts, for each price profile.

Writes ``bench/results/multiturn.md``, ``bench/results/multiturn_conversations.json``,
``docs/multiturn_bill.png`` and the section between ``<!-- multiturn:start -->`` and
``<!-- multiturn:end -->`` of ``docs/BENCHMARKS.md``.

    .venv/bin/python -m bench.multiturn                   # make multiturn
    .venv/bin/python -m bench.multiturn --conversations 2 --min-turns 4 --max-turns 5 --no-docs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.compressor_bench import cpu_name
from bench.cost_model import PROFILES, BilledRequests, PriceProfile, net_saving, render_ids, session_cache, session_cost
from bench.load import write_section
from bench.stats import bootstrap_ci, share
from ccproxy.compression.gateway import ContextCompressor
from ccproxy.compression.policy import KeepHint
from ccproxy.protocol import CompressionControl
from ccproxy.settings import Settings
from ccproxy.tokens import TiktokenCounter, content_text, tiktoken_encoding
from nqdata.items import Item, contains_answer, hard_distractor_items, load_records

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "bench" / "results" / "multiturn.md"
RESULTS_JSON = ROOT / "bench" / "results" / "multiturn_conversations.json"
PLOT = ROOT / "docs" / "multiturn_bill.png"
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
MARKS = ("<!-- multiturn:start -->", "<!-- multiturn:end -->")
ARMS = ("full", "rescore", "stable")
SYSTEM = (
    "Answer each question using only the search results in the same message (some of which "
    "might be irrelevant). Keep answers short."
)
FINAL_PREFIX = "Going back to an earlier question of mine: "


# --- conversations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Conversation:
    number: int
    turns: tuple[Item, ...]  # the turns with documents; the final turn re-asks turns[needed]
    needed: int

    @property
    def n_requests(self) -> int:
        return len(self.turns) + 1

    def user_text(self, n: int) -> str:
        if n == len(self.turns):
            return FINAL_PREFIX + self.turns[self.needed].question
        item = self.turns[n]
        return "\n\n".join([*item.document_texts(), f"Question: {item.question}"])

    def reply(self, n: int) -> str:
        item = self.turns[self.needed if n == len(self.turns) else n]
        return f"{item.record.answers[0]}."

    def request(self, n: int) -> list[dict[str, str]]:
        """The messages of request n (0-based): the system prompt, the earlier turns with their
        replies, and user message n."""
        messages = [{"role": "system", "content": SYSTEM}]
        for k in range(n):
            messages.append({"role": "user", "content": self.user_text(k)})
            messages.append({"role": "assistant", "content": self.reply(k)})
        return messages + [{"role": "user", "content": self.user_text(n)}]


def build_conversations(
    items: Sequence[Item], n_conversations: int, min_turns: int, max_turns: int, seed: int
) -> list[Conversation]:
    """Lengths spread evenly over [min_turns, max_turns] requests, so both ends are measured;
    random records (none twice in one conversation) and a random needed turn."""
    rng = random.Random(seed)
    conversations = []
    for number in range(n_conversations):
        share = number / (n_conversations - 1) if n_conversations > 1 else 0.0
        n_requests = round(min_turns + (max_turns - min_turns) * share)
        turns = tuple(rng.sample(list(items), n_requests - 1))
        conversations.append(Conversation(number, turns, rng.randrange(len(turns))))
    return conversations


# --- one arm over one conversation -----------------------------------------------------------


@dataclass
class ArmRun(BilledRequests):
    arm: str
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)
    extends_previous: list[bool] = field(default_factory=list)  # request n starts with request n-1
    compression_seconds: float = 0.0
    gold_kept: bool = False
    answer_in_context: bool = False
    forwarded_messages: int = 0


def final_context(messages: Sequence[dict[str, Any]]) -> str:
    """What the model reads before the final question."""
    return "\n".join(content_text(m.get("content")) for m in messages[:-1])


async def run_arm(
    arm: str, conversation: Conversation, compressors: dict[str, ContextCompressor], counter: TiktokenCounter
) -> ArmRun:
    encoding = tiktoken_encoding("o200k_base")
    run = ArmRun(arm)
    prompts: list[list[int]] = []
    previous: list[dict[str, Any]] | None = None
    forwarded: list[dict[str, Any]] = []
    for n in range(conversation.n_requests):
        messages = conversation.request(n)
        forwarded = messages
        if arm != "full":
            compressor = compressors[arm]
            started = time.perf_counter()
            # ``compress`` raises instead of failing open: a benchmark must not hide a failure.
            result = await compressor.compress(messages, compressor.plan(CompressionControl()), counter)
            run.compression_seconds += time.perf_counter() - started
            forwarded = result.forwarded
        prompts.append(render_ids(forwarded, encoding.encode_ordinary))
        run.output_tokens.append(len(encoding.encode_ordinary(conversation.reply(n))))
        if previous is not None:
            run.extends_previous.append(forwarded[: len(previous)] == previous)
        previous = forwarded
    run.prompt_tokens = [len(p) for p in prompts]
    run.cached_tokens = session_cache(prompts)
    context = final_context(forwarded)
    needed = conversation.turns[conversation.needed]
    run.gold_kept = f"(Title: {needed.record.gold.title}) {needed.record.gold.text}" in context
    run.answer_in_context = contains_answer(context, needed.record.answers)
    run.forwarded_messages = len(forwarded)
    return run


# --- the whole run ---------------------------------------------------------------------------


def load_items(n_documents: int, seed: int) -> list[Item]:
    records = load_records("eval")
    # A one-letter answer ("S") is in nearly every passage, which leaves no distractor to mine.
    texts = [f"{r.gold.title} {r.gold.text}" for r in records]
    usable = [r for r in records if sum(not contains_answer(t, r.answers) for t in texts) > n_documents]
    return hard_distractor_items(usable, n_documents, seed=seed)


def make_compressors(base: Settings) -> dict[str, ContextCompressor]:
    from ccproxy.compression.scoring import load_scorer

    scorer = load_scorer(base)

    async def score(query: str, units: Sequence[str], hint: KeepHint | None = None) -> list[float]:
        return await asyncio.to_thread(scorer.score, query, list(units), hint)

    return {
        arm: ContextCompressor(score, base.model_copy(update={"compression_history": arm}))
        for arm in ("rescore", "stable")
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def run_all(
    conversations: Sequence[Conversation], compressors: dict[str, ContextCompressor]
) -> list[dict[str, ArmRun]]:
    counter = TiktokenCounter(tiktoken_encoding("o200k_base"))
    runs = []
    started = time.perf_counter()
    for conversation in conversations:
        runs.append({arm: await run_arm(arm, conversation, compressors, counter) for arm in ARMS})
        seconds = {arm: f"{runs[-1][arm].compression_seconds:.0f} s" for arm in ("rescore", "stable")}
        log(f"conversation {conversation.number + 1}/{len(conversations)}: {conversation.n_requests} requests, "
            f"compression {seconds} ({time.perf_counter() - started:.0f} s in all)")
    return runs


# --- report ----------------------------------------------------------------------------------


def saving_ci(runs: Sequence[dict[str, ArmRun]], arm: str, profile: PriceProfile, seed: int) -> tuple[float, float]:
    pairs = [(r["full"].bill(profile) - r[arm].bill(profile), r["full"].bill(profile)) for r in runs]
    return bootstrap_ci(pairs, seed)


def arm_totals(runs: Sequence[dict[str, ArmRun]], arm: str) -> dict[str, Any]:
    mine = [r[arm] for r in runs]
    prompt = sum(sum(r.prompt_tokens) for r in mine)
    full = sum(sum(r["full"].prompt_tokens) for r in runs)
    return {
        "gold_kept": share([r.gold_kept for r in mine]),
        "answer_in_context": share([r.answer_in_context for r in mine]),
        "prompt_tokens": prompt,
        "saved": 1 - prompt / full,
        "extends_previous": share([x for r in mine for x in r.extends_previous]),
        "cached_share": sum(sum(r.cached_tokens) for r in mine) / prompt,
        "compression_seconds": sum(r.compression_seconds for r in mine),
    }


def tables(runs: Sequence[dict[str, ArmRun]], seed: int) -> str:
    totals = {arm: arm_totals(runs, arm) for arm in ARMS}
    lines = [
        "| arm | needed turn's gold passage in the final request | its answer in the final context "
        "| input tokens forwarded | saved vs full | requests that extend the previous one "
        "| input tokens served from the cache | compression time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, t in totals.items():
        lines.append(
            f"| `{arm}` | {t['gold_kept']:.3f} | {t['answer_in_context']:.3f} | {t['prompt_tokens']:,} "
            f"| {t['saved']:.1%} | {t['extends_previous']:.1%} | {t['cached_share']:.1%} "
            f"| {t['compression_seconds']:.0f} s |"
        )
    header = ["arm"]
    for profile in PROFILES:
        header += [f"{profile.name}: bill, cache ignored", f"{profile.name}: bill, cache counted",
                   f"{profile.name}: net saving vs full (95 % CI)"]
    lines += ["", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for arm in ARMS:
        cells = [f"`{arm}`"]
        for profile in PROFILES:
            uncached = sum(r[arm].bill(profile, cache=False) for r in runs)
            cached = sum(r[arm].bill(profile) for r in runs)
            baseline = sum(r["full"].bill(profile) for r in runs)
            saving = "—"
            if arm != "full":
                low, high = saving_ci(runs, arm, profile, seed)
                saving = f"{net_saving(cached, baseline):+.1%} ({low:+.1%} … {high:+.1%})"
            cells += [f"${uncached:.3f}", f"${cached:.3f}", saving]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(command: str, options: argparse.Namespace, conversations: Sequence[Conversation],
           runs: Sequence[dict[str, ArmRun]], wall_seconds: float, memo: tuple[int, int]) -> str:
    turns = [c.n_requests for c in conversations]
    tokens_full = [sum(r["full"].prompt_tokens) / len(r["full"].prompt_tokens) for r in runs]
    last_full = [r["full"].prompt_tokens[-1] for r in runs]
    profiles = "; ".join(
        f"**{p.name}**: ${p.input:.2f} / M input, ${p.cached_input:.2f} cached, ${p.output:.2f} output"
        + (f", ${p.cache_write:.2f} cache write" if p.cache_write is not None else "")
        + f" ({p.source})"
        for p in PROFILES
    )
    parts = [
        "## Multi-turn chats: prompt caching and the bill",
        "",
        f"Command: `{command}`",
        "",
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu_name()} ({os.cpu_count()} cores), "
        f"{wall_seconds / 60:.1f} min in all. {len(conversations)} conversations of {min(turns)}–{max(turns)} "
        f"requests (lengths spread evenly, {sum(turns)} requests in all; seed {options.seed}) built from the NQ "
        f"evaluation part (lines 500–999): each turn one question with {options.documents} documents (its gold "
        f"passage and hard distractors, BM25 + MiniLM), the canned reply is the gold answer, and the final request asks one "
        f"earlier turn's question again, with no documents. Every request resends the history: "
        f"{sum(tokens_full) / len(tokens_full):,.0f} input tokens per request on average, "
        f"{sum(last_full) / len(last_full):,.0f} in the final ones. Compression: server defaults (ratio 0.5 of the "
        f"droppable tokens, threshold 1,000 tokens), the default scorer (QR heads + MiniLM, `both`); "
        f"`stable`'s memo answered {memo[0]:,} segment look-ups and missed {memo[1]:,} "
        f"(each miss scored one turn).",
        "",
        "Tokens: tiktoken o200k over the rendered chat (OpenAI's cookbook framing, each message tokenized on its "
        "own; `bench/cost_model.py`). Cache: a request's cached tokens are its longest common token prefix with "
        "any earlier request of the conversation, rounded down to 128 tokens, none under 1,024 (OpenAI's "
        "documented rule; entries assumed not to expire between turns). Prices, as assumptions: " + profiles + ".",
        "",
        tables(runs, options.seed),
        "",
        "Columns: the gold passage of the turn the final question depends on, and its answer anywhere before the "
        "final question (e.g. in the kept reply), in the final request; input tokens over every request; the "
        "share of requests whose forwarded messages start with the previous request's forwarded messages; the "
        "share of all input tokens billed as cached; the time spent compressing on this CPU. Net saving: the "
        "bill with caching counted against `full`'s bill with caching counted; 95 % bootstrap intervals over "
        "conversations.",
        "",
        "![cumulative bill per request](multiturn_bill.png)",
    ]
    return "\n".join(parts) + "\n"


def plot(conversations: Sequence[Conversation], runs: Sequence[dict[str, ArmRun]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profile = PROFILES[0]
    longest = max(range(len(runs)), key=lambda i: conversations[i].n_requests)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm in ARMS:
        run = runs[longest][arm]
        costs = [session_cost([request], profile) for request in run.requests()]
        cumulative = [sum(costs[: n + 1]) for n in range(len(costs))]
        left.plot(range(1, len(costs) + 1), cumulative, label=arm, marker=".")
        shares = []
        for n in range(max(c.n_requests for c in conversations)):
            present = [r[arm] for r in runs if n < len(r[arm].prompt_tokens)]
            shares.append(sum(r.cached_tokens[n] for r in present) / sum(r.prompt_tokens[n] for r in present))
        right.plot(range(1, len(shares) + 1), shares, label=arm, marker=".")
    left.set(xlabel="request", ylabel=f"cumulative bill, USD ({profile.name}, cache counted)",
             title=f"longest conversation ({conversations[longest].n_requests} requests)")
    right.set(xlabel="request", ylabel="share of input tokens served from the cache",
              title="cache hits per request, all conversations")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def conversation_json(conversation: Conversation, arms: dict[str, ArmRun]) -> dict[str, Any]:
    return {
        "conversation": conversation.number,
        "lines": [item.record.line for item in conversation.turns],
        "gold_index": [item.gold_index for item in conversation.turns],
        "needed_turn": conversation.needed,
        "arms": {
            arm: {**asdict(run), "bill": {p.name: round(run.bill(p), 6) for p in PROFILES}}
            for arm, run in arms.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--min-turns", type=int, default=10, help="fewest requests in a conversation")
    parser.add_argument("--max-turns", type=int, default=40, help="most requests in a conversation")
    parser.add_argument("--documents", type=int, default=3, help="documents per turn (gold + hard distractors)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-docs", action="store_true", help="write bench/results only, not docs/")
    args = parser.parse_args(argv)
    if not 2 <= args.min_turns <= args.max_turns:
        parser.error("need 2 <= --min-turns <= --max-turns")
    command = "python -m bench.multiturn" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    started = time.perf_counter()

    # rescore decides the whole history again at every request: ~4-6 s per request at 10-15 k
    # tokens on 2 CPU cores, so the defaults (8 conversations, 200 requests) take ~15 minutes.
    log(f"{args.conversations} conversations of {args.min_turns}-{args.max_turns} requests, "
        f"{args.documents} documents per turn, seed {args.seed}")
    items = load_items(args.documents, args.seed)
    conversations = build_conversations(items, args.conversations, args.min_turns, args.max_turns, args.seed)
    compressors = make_compressors(Settings(compressor_timeout_s=3600))
    runs = asyncio.run(run_all(conversations, compressors))
    memo = compressors["stable"].history_memo

    section = report(command, args, conversations, runs, time.perf_counter() - started, (memo.hits, memo.misses))
    RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_MD.write_text(section, encoding="utf-8")
    RESULTS_JSON.write_text(
        json.dumps([conversation_json(c, r) for c, r in zip(conversations, runs)], indent=1) + "\n", encoding="utf-8"
    )
    if not args.no_docs:
        plot(conversations, runs, PLOT)
        write_section(f"{MARKS[0]}\n{section}{MARKS[1]}\n", BENCHMARKS_MD, MARKS)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
