"""Agent traces through the product's compression: tokens, prompt-cache hits, the bill, and
whether the tool output a final question needs is still there (issue 17).

Traces are chat-completions agent loops built from real text, deterministically from a seed:

* coding traces: a task about this repository, then steps of ``read_file`` (a window of a real
  file of ``ccproxy/``, ``tests/``, ``bench/`` or ``docs/``, read from disk, numbered like
  ``cat -n``), ``grep`` (a regex run over those files; hits as ``path:line: text`` lines or as
  one JSON array of ``{path, line, text}`` objects) and ``run_tests`` (consecutive pieces of one
  real ``pytest tests/unit -v`` log, ``bench/data/pytest_log.txt``);
* research traces: a list of questions to research, then steps of ``search`` (a JSON array of
  titles, urls and snippets) and ``open_page`` (several NQ passages as one page), from the
  evaluation part of the NQ file (``nqdata/items.py``).

Every step is a request that resends the whole history, as agent loops do. After the last step
the agent reports back and the user asks one question whose answer lies in ONE earlier tool
result: the *needle* (a definition line read from a file, one grep hit, one test's result line,
or the gold passage of an NQ question on a page opened at step k). "Needed output kept" means
the needle appears verbatim in the final forwarded request.

Arms, side by side over the same requests: ``none`` (forwarded as is), ``rescore`` (no history
memo: the whole conversation decided again against the newest question), ``stable`` (the
server default: history memo, agent steps compressed once each against the task, lossy notes),
``lossless`` (``stable`` with retrievable markers; an oracle model calls ``ccproxy_retrieve``
once when the needle is only behind a marker) and ``truncate`` (the oldest tool results
replaced by ``[output truncated]`` until the request is no longer than what ``stable`` sent).
Compression is the product's own code in-process (``ContextCompressor``, server defaults);
the bill comes from ``bench/cost_model.py``.

Writes ``bench/results/agent_traces.md``, ``bench/results/agent_traces.json`` and the section
between ``<!-- agent:start -->`` and ``<!-- agent:end -->`` of ``docs/BENCHMARKS.md``.

    .venv/bin/python -m bench.agent_traces                  # make agent-bench (23 min on 2 cores at load 2-3)
    .venv/bin/python -m bench.agent_traces --quick --no-docs  # 3 traces of 20 steps (~2 min)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from bench.cost_model import (
    IM_END,
    IM_SEP,
    IM_START,
    OPENAI_CACHE_BLOCK,
    OPENAI_CACHE_MINIMUM,
    PROFILES,
    BilledRequests,
    PriceProfile,
    net_saving,
    session_cost,
)
from bench.stats import bootstrap_ci, share

ROOT = Path(__file__).resolve().parents[1]
PYTEST_LOG = ROOT / "bench" / "data" / "pytest_log.txt"
RESULTS_MD = ROOT / "bench" / "results" / "agent_traces.md"
RESULTS_JSON = ROOT / "bench" / "results" / "agent_traces.json"
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
MARKS = ("<!-- agent:start -->", "<!-- agent:end -->")
ARMS = ("none", "rescore", "stable", "lossless", "eager", "truncate")
CCPROXY_ARMS = ("rescore", "stable", "lossless", "eager")
COMPRESSED_ARMS = ARMS[1:]
# What the traces are built from: tracked text of the repository, never this benchmark's own files
# (its results hold needles) nor other benchmarks' result files.
CORPUS_DIRS = ("ccproxy", "tests", "bench", "docs")
CORPUS_SUFFIXES = (".py", ".md")
OWN_PATHS = frozenset({
    "bench/agent_traces.py", "tests/unit/test_agent_traces.py", "bench/data/pytest_log.txt",
    "bench/results/agent_traces.md",
})
OUTPUT_TOKENS = 40  # each answer of the model: one tool call, or a short reply
TRUNCATED = "[output truncated]"
GOAL_SAVING, GOAL_KEPT = 0.50, 0.95
MARKER = re.compile(r"ccproxy_retrieve id=([0-9a-f]{24})")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- traces ----------------------------------------------------------------------------------


def _tool(name: str, description: str, **properties: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {key: {"type": kind} for key, kind in properties.items()},
                "required": list(properties)[:1],
            },
        },
    }


CODING_TOOLS = [
    _tool("read_file", "Read a file of the repository; numbered lines from offset, at most limit of them.",
          path="string", offset="integer", limit="integer"),
    _tool("grep", "Search the repository's files for a regular expression.", pattern="string", format="string"),
    _tool("run_tests", "Run the test suite (pytest) and show its output.", command="string"),
]
RESEARCH_TOOLS = [
    _tool("search", "Search the web; a JSON array of results (title, url, snippet).", query="string"),
    _tool("open_page", "Open a web page and return its text.", url="string"),
]
CODING_SYSTEM = (
    "You are a coding agent working in the ccproxy repository (a context-compression proxy for the "
    "OpenAI and Anthropic APIs, in Python). Use the tools to read files, search the code and run the "
    "tests. Make small, well-tested changes and report what you did."
)
RESEARCH_SYSTEM = (
    "You are a research agent. Use the search and open_page tools to find reliable sources for the "
    "user's questions. Answer from what the pages say, and name the page each answer comes from."
)
CODING_TASKS = (
    "`{name}` in `{path}` misbehaves on an edge case a user reported. Find where it is defined and used, "
    "read the surrounding code and its tests, fix it and make sure the unit tests still pass.",
    "Refactor `{name}` in `{path}`: it has grown hard to follow. Look at every caller first, keep the "
    "behaviour identical and run the unit tests afterwards.",
    "Add a unit test that covers `{name}` (`{path}`) with empty and very large inputs. Check how the "
    "existing tests are written and run them when you are done.",
    "Write a short note for docs/ on how `{name}` in `{path}` works and where it is called from. Read "
    "the code and the tests to get the details right.",
)
CODING_DONE = "Done: I read the code and the tests around the change, made it, and the unit tests pass."
RESEARCH_DONE = "I have researched each question and noted the answers with their sources."


@dataclass(frozen=True)
class Step:
    name: str
    arguments: dict[str, Any]
    output: str


@dataclass(frozen=True)
class Trace:
    number: int
    kind: str  # "coding" | "research"
    system: str
    task: str
    steps: tuple[Step, ...]
    done: str  # the agent's report after the last step
    question: str  # the final user message
    needle: str  # verbatim in steps[needle_step].output and in no other tool result
    needle_step: int
    needle_kind: str
    tools: tuple[dict[str, Any], ...]

    @property
    def n_requests(self) -> int:
        return len(self.steps) + 2  # before each step, after the last one, and the final question

    def messages(self) -> list[dict[str, Any]]:
        """The final request: every step, the agent's report and the question."""
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}, {"role": "user", "content": self.task}]
        for k, step in enumerate(self.steps):
            call_id = f"call_{self.number}_{k}"
            call = {"id": call_id, "type": "function",
                    "function": {"name": step.name, "arguments": json.dumps(step.arguments)}}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            messages.append({"role": "tool", "tool_call_id": call_id, "content": step.output})
        messages.append({"role": "assistant", "content": self.done})
        messages.append({"role": "user", "content": self.question})
        return messages

    def request(self, n: int, final_messages: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Request n (0-based): the messages before step n; the last one asks the question."""
        messages = final_messages if final_messages is not None else self.messages()
        if n == self.n_requests - 1:
            return list(messages)
        return messages[: 2 + 2 * n]

    def tool_results_holding_needle(self) -> list[int]:
        return [k for k, step in enumerate(self.steps) if self.needle in step.output]


# -- coding


@dataclass(frozen=True)
class RepoFile:
    path: str
    lines: tuple[str, ...]


def corpus_rev_help(default: str = "the working tree, which changes with every commit") -> str:
    return (f"cut the coding traces from the files as they were at this git revision (default: {default}); "
            "the report names the one it used")


CORPUS_REV_HELP = corpus_rev_help()


def repo_corpus(root: Path = ROOT, revision: str | None = None) -> list[RepoFile]:
    """The tracked .py and .md files of ccproxy/, tests/, bench/ and docs/: as they are on disk,
    or as they were at a git ``revision``. The coding traces are cut from these files, so a run
    over the working tree changes whenever the code does; a revision makes it reproducible."""
    if revision is None:
        listed = subprocess.run(["git", "ls-files", *CORPUS_DIRS], cwd=root, capture_output=True, text=True, check=True)
    else:
        listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", revision, "--", *CORPUS_DIRS], cwd=root,
                                capture_output=True, text=True)
        if listed.returncode != 0:
            raise SystemExit(f"--corpus-rev {revision}: not in this clone's history ({listed.stderr.strip()}); "
                             "fetch it (a shallow clone lacks it) or leave the option out")
    files = []
    for path in sorted(listed.stdout.split()):
        if not path.endswith(CORPUS_SUFFIXES) or path in OWN_PATHS or path.startswith("bench/results/"):
            continue
        text = _file_text(root, path, revision)
        if text is not None and text.strip():
            files.append(RepoFile(path, tuple(text.splitlines())))
    return files


def _file_text(root: Path, path: str, revision: str | None) -> str | None:
    try:
        if revision is None:
            return (root / path).read_text(encoding="utf-8")
        shown = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=root, capture_output=True, check=True)
        return shown.stdout.decode("utf-8")
    except (OSError, UnicodeDecodeError, subprocess.CalledProcessError):
        return None  # deleted in the working tree, or not text


def pytest_log_lines(path: Path = PYTEST_LOG) -> list[str]:
    """The recorded test log, without its provenance line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if not line.startswith("# provenance:")]


_DEFINITION = re.compile(r"^\s*(?:async\s+)?(?:def|class)\s+(\w+)|^([A-Z][A-Z0-9_]{2,})\s*(?::[^=]+)?=\s*\S")
_IDENTIFIER = re.compile(r"^\s*(?:async\s+)?(?:def|class)\s+([A-Za-z_]\w{3,})")


def _definitions(file: RepoFile) -> list[str]:
    return [m.group(1) for line in file.lines if (m := _IDENTIFIER.match(line)) and not m.group(1).startswith("test_")]


def _read_output(file: RepoFile, offset: int, limit: int) -> str:
    window = file.lines[offset - 1 : offset - 1 + limit]
    return "\n".join(f"{offset + k:>6}\t{line}" for k, line in enumerate(window))


def grep_hits(corpus: Sequence[RepoFile], pattern: str, limit: int) -> tuple[list[tuple[str, int, str]], int]:
    """(the first ``limit`` hits of ``pattern`` as (path, line, text), how many there were)."""
    regex = re.compile(pattern)
    hits = []
    for file in corpus:
        for number, line in enumerate(file.lines, 1):
            if regex.search(line):
                hits.append((file.path, number, line.strip()[:200]))
    return hits[:limit], len(hits)


def _grep_output(hits: Sequence[tuple[str, int, str]], total: int, as_json: bool) -> str:
    if as_json:
        return json.dumps([{"path": p, "line": n, "text": t} for p, n, t in hits], ensure_ascii=False)
    lines = [f"{p}:{n}: {t}" for p, n, t in hits]
    if total > len(hits):
        lines.append(f"[{total - len(hits)} more matches not shown]")
    return "\n".join(lines)


def _test_pieces(log_lines: Sequence[str], rng: random.Random) -> list[str]:
    """The log cut into consecutive pieces of 20-55 lines."""
    pieces, start = [], 0
    while start < len(log_lines):
        size = rng.randint(20, 55)
        pieces.append("\n".join(log_lines[start : start + size]))
        start += size
    return pieces


def coding_steps(corpus: Sequence[RepoFile], focus: RepoFile, test_pieces: Sequence[str], n_steps: int,
                 rng: random.Random) -> list[Step]:
    by_path = {f.path: f for f in corpus}
    names = _definitions(focus) or ["main"]
    recent_paths: list[str] = [focus.path]
    steps: list[Step] = []
    piece = rng.randrange(len(test_pieces))
    while len(steps) < n_steps:
        roll = rng.random()
        if roll < 0.3 or not steps:
            # grep: a name from the focus file mostly, else from any file
            source = focus if rng.random() < 0.6 else rng.choice(corpus)
            candidates = _definitions(source) or names
            name = rng.choice(candidates)
            pattern = rf"\b{re.escape(name)}\b" if rng.random() < 0.7 else rf"def \w*{re.escape(name[:6])}"
            hits, total = grep_hits(corpus, pattern, limit=25)
            if len(hits) < 3:
                continue
            as_json = rng.random() < 0.5
            recent_paths = sorted({p for p, _, _ in hits})
            arguments = {"pattern": pattern, "format": "json" if as_json else "text"}
            steps.append(Step("grep", arguments, _grep_output(hits, total, as_json)))
        elif roll < 0.8:
            # read_file: a file grep just showed or the focus file, else any file
            path = rng.choice(recent_paths) if rng.random() < 0.5 else rng.choice(corpus).path
            file = by_path[path]
            limit = rng.randint(25, 90)
            offset = 1 if len(file.lines) <= limit or rng.random() < 0.3 else rng.randint(1, len(file.lines) - limit + 1)
            output = _read_output(file, offset, limit)
            if not output.strip():
                continue
            steps.append(Step("read_file", {"path": path, "offset": offset, "limit": limit}, output))
        else:
            steps.append(Step("run_tests", {"command": "pytest tests/unit -v"}, test_pieces[piece % len(test_pieces)]))
            piece += 1
    return steps


_TEST_RESULT = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|XFAIL|ERROR)")


def _needle_candidates(step: Step) -> list[tuple[str, str, str]]:
    """(needle, question, kind) for the lines of one step's output that a question could ask for."""
    found = []
    if step.name == "read_file":
        path = step.arguments["path"]
        for raw in step.output.split("\n"):
            line = raw.split("\t", 1)[1] if "\t" in raw else raw
            match = _DEFINITION.match(line)
            text = line.strip()
            if not match or len(text) < 20:
                continue
            if match.group(1):
                question = (f"Before we close this: in `{path}`, what is the exact definition line of "
                            f"`{match.group(1)}`? Quote it as it appears in the file.")
            else:
                question = f"One more thing: what value is `{match.group(2)}` set to in `{path}`? Quote the line."
            found.append((text, question, "read_file"))
    elif step.name == "grep":
        pattern = step.arguments["pattern"]
        if step.arguments["format"] == "json":
            hits = [(h["path"], h["line"], h["text"]) for h in json.loads(step.output)]
        else:
            hits = [(p, int(n), t) for p, n, t in (re.match(r"^(.+?):(\d+): (.*)$", line).groups()  # type: ignore[union-attr]
                                                   for line in step.output.split("\n") if not line.startswith("["))]
        for path, number, text in hits:
            if len(text) < 20:
                continue
            needle = json.dumps(text, ensure_ascii=False)[1:-1] if step.arguments["format"] == "json" else text
            question = (f"Your search for `{pattern}` earlier matched line {number} of `{path}`. "
                        f"What exactly does that line say?")
            found.append((needle, question, "grep_json" if step.arguments["format"] == "json" else "grep"))
    else:
        for line in step.output.split("\n"):
            match = _TEST_RESULT.match(line)
            if match:
                question = (f"In the test run earlier, what did pytest report for `{match.group(1)}`? "
                            f"Quote its result line.")
                found.append((line.rstrip(), question, "run_tests"))
    return found


def coding_trace(number: int, n_steps: int, corpus: Sequence[RepoFile], log_lines: Sequence[str],
                 rng: random.Random) -> Trace:
    focuses = [f for f in corpus if f.path.startswith("ccproxy/") and len(f.lines) >= 80 and _definitions(f)]
    for _ in range(50):
        focus = rng.choice(focuses)
        task = rng.choice(CODING_TASKS).format(name=rng.choice(_definitions(focus)), path=focus.path)
        steps = coding_steps(corpus, focus, _test_pieces(log_lines, rng), n_steps, rng)
        order = list(range(len(steps)))
        rng.shuffle(order)
        for k in order:
            candidates = _needle_candidates(steps[k])
            rng.shuffle(candidates)
            for needle, question, kind in candidates:
                holders = [j for j, s in enumerate(steps) if needle in s.output]
                if holders == [k] and needle not in task:
                    return Trace(number, "coding", CODING_SYSTEM, task, tuple(steps), CODING_DONE, question,
                                 needle, k, kind, tuple(CODING_TOOLS))
    raise RuntimeError(f"no unique needle for coding trace {number}")


# -- research


def _url(title: str) -> str:
    return "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")


def _page(title: str, passages: Sequence[tuple[str, str]]) -> str:
    sections = [f"{_url(title)}\n\n# {title}"]
    for heading, text in passages:
        sections.append(f"## {heading}\n{' '.join(text.split())}")
    return "\n\n".join(sections)


def research_trace(number: int, n_steps: int, records: Sequence[Any], rng: random.Random) -> Trace:
    """Questions researched one after another (search, open the gold page, sometimes another
    result or a second search); each page holds its gold passage among passages of records
    that no question of this trace asks about."""
    # More questions than the steps can reach; the task lists those the steps reached.
    chosen = rng.sample(list(records), min(len(records) // 2, n_steps))
    chosen_lines = {r.line for r in chosen}
    golds = {" ".join(r.gold.text.split()) for r in chosen}
    others = [r for r in records if r.line not in chosen_lines and " ".join(r.gold.text.split()) not in golds]
    steps: list[Step] = []
    opened: dict[int, int] = {}  # question -> the step that opened its gold page
    reached = 0
    for q, record in enumerate(chosen):
        if len(steps) >= n_steps:
            break
        reached = q + 1
        results = [record, *rng.sample(others, 6)]
        rng.shuffle(results)
        listing = [{"title": r.gold.title, "url": _url(r.gold.title),
                    "snippet": " ".join(r.gold.text.split())[:180] + "…"} for r in results]
        steps.append(Step("search", {"query": record.question}, json.dumps(listing, ensure_ascii=False)))
        visits = [record]
        if rng.random() < 0.3:
            visits.insert(rng.randrange(2), rng.choice([r for r in results if r is not record]))
        for visit in visits:
            if len(steps) >= n_steps:
                break
            filler = [(r.gold.title, r.gold.text) for r in rng.sample(others, rng.randint(2, 5))]
            filler.insert(rng.randrange(len(filler) + 1), (visit.gold.title, visit.gold.text))
            steps.append(Step("open_page", {"url": _url(visit.gold.title)}, _page(visit.gold.title, filler)))
            if visit is record:
                opened[q] = len(steps) - 1
        if len(steps) < n_steps and rng.random() < 0.2:
            query = " ".join(record.question.split()[:4])
            listing = [{"title": r.gold.title, "url": _url(r.gold.title),
                        "snippet": " ".join(r.gold.text.split())[:180] + "…"} for r in rng.sample(others, 7)]
            steps.append(Step("search", {"query": query}, json.dumps(listing, ensure_ascii=False)))
    chosen = chosen[:reached]
    numbered = "\n".join(f"{q + 1}. {r.question}?" for q, r in enumerate(chosen))
    task = ("I am putting together a quiz. Research each of these questions on the web and note the answer "
            f"with the page it comes from:\n{numbered}")
    q = rng.choice(sorted(opened))
    needle = " ".join(chosen[q].gold.text.split())
    question = f"Before I publish: {chosen[q].question}? Answer from the page you opened for it."
    return Trace(number, "research", RESEARCH_SYSTEM, task, tuple(steps), RESEARCH_DONE, question, needle,
                 opened[q], "open_page", tuple(RESEARCH_TOOLS))


def step_counts(n_traces: int, min_steps: int, max_steps: int) -> list[int]:
    """Lengths spread log-uniformly over [min_steps, max_steps] (as many traces from 20 to 49 steps
    as from 49 to 120): short agent sessions are the common ones, and the scoring of long ones is
    what bounds the run's time on 2 CPU cores."""
    if n_traces == 1:
        return [min_steps]
    ratio = max_steps / min_steps
    return [round(min_steps * ratio ** (k / (n_traces - 1))) for k in range(n_traces)]


def build_traces(n_traces: int, min_steps: int, max_steps: int, seed: int, *,
                 corpus: Sequence[RepoFile] | None = None, log_lines: Sequence[str] | None = None,
                 nq_part: Literal["train", "eval"] = "eval") -> list[Trace]:
    """Coding and research traces alternately over the sorted lengths, so both kinds span the
    range; each trace from its own generator (seed, number). The research traces read the NQ
    file's ``nq_part``: the evaluation part for every benchmark, the training part for head
    detection (``training/trace_items.py``)."""
    from nqdata.items import load_records

    corpus = repo_corpus() if corpus is None else corpus
    log_lines = pytest_log_lines() if log_lines is None else log_lines
    records = load_records(nq_part)
    traces = []
    for number, n_steps in enumerate(step_counts(n_traces, min_steps, max_steps)):
        rng = random.Random(f"{seed}:{number}")
        if number % 2 == 0:
            traces.append(coding_trace(number, n_steps, corpus, log_lines, rng))
        else:
            traces.append(research_trace(number, n_steps, records, rng))
    return traces


# --- tokens and the cache ---------------------------------------------------------------------


class Renderer:
    """Prompt token ids as ``bench/cost_model.render_ids`` makes them (each message framed by
    ``<|im_start|>role<|im_sep|> … <|im_end|>``, each piece tokenized on its own with o200k),
    plus what it leaves out and an agent loop is billed for: the tool definitions (one block
    before the messages, where OpenAI puts them) and each tool call's name and arguments.
    Each distinct message is tokenized once."""

    def __init__(self, encode: Callable[[str], list[int]]) -> None:
        self.encode = encode
        self._ids: dict[Any, list[int]] = {}

    def message(self, message: dict[str, Any]) -> list[int]:
        from ccproxy.tokens import content_text

        calls = tuple(
            (c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or ()
        )
        key = (message.get("role"), content_text(message.get("content")), calls)
        ids = self._ids.get(key)
        if ids is None:
            ids = [IM_START, *self.encode(str(key[0])), IM_SEP, *self.encode(key[1])]
            for name, arguments in calls:
                ids += self.encode(f"{name}({arguments})")
            ids.append(IM_END)
            self._ids[key] = ids
        return ids

    def tools(self, tools: Sequence[dict[str, Any]]) -> list[int]:
        key = ("<tools>", json.dumps(list(tools), sort_keys=True))
        ids = self._ids.get(key)
        if ids is None:
            ids = [IM_START, *self.encode("tools"), IM_SEP, *self.encode(key[1]), IM_END]
            self._ids[key] = ids
        return ids

    def prompt(self, tools: Sequence[dict[str, Any]], messages: Sequence[dict[str, Any]]) -> list[int]:
        ids = list(self.tools(tools))
        for message in messages:
            ids += self.message(message)
        return ids + [IM_START, *self.encode("assistant"), IM_SEP]

    def count(self, tools: Sequence[dict[str, Any]], messages: Sequence[dict[str, Any]]) -> int:
        return len(self.tools(tools)) + sum(len(self.message(m)) for m in messages) + 3


class PrefixCache:
    """``cost_model.session_cache`` one request at a time, in linear time: a request's cached
    tokens are its longest prefix of whole 128-token blocks that an earlier request of the
    session also starts with (0 under 1,024). Equal to ``cached_tokens``, which takes the longest
    common prefix with any earlier prompt rounded down to a block, since a common prefix of m
    whole blocks is exactly a shared chain hash of m blocks."""

    def __init__(self, block: int = OPENAI_CACHE_BLOCK, minimum: int = OPENAI_CACHE_MINIMUM) -> None:
        self.block, self.minimum = block, minimum
        self._seen: set[bytes] = set()

    def __call__(self, prompt: Sequence[int]) -> int:
        raw = array("I", prompt).tobytes()
        step = self.block * 4
        digest, cached, matching, chain = b"", 0, True, []
        for k in range(len(prompt) // self.block):
            digest = hashlib.blake2b(digest + raw[k * step : (k + 1) * step], digest_size=16).digest()
            chain.append(digest)
            if matching and digest in self._seen:
                cached = (k + 1) * self.block
            else:
                matching = False
        self._seen.update(chain)
        return cached if cached >= self.minimum else 0


# --- arms ------------------------------------------------------------------------------------


@dataclass
class ArmRun(BilledRequests):
    arm: str
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)
    extends_previous: list[bool] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    compression_seconds: float = 0.0
    slowest_seconds: float = 0.0  # the slowest single request's compression
    over_timeout: int = 0  # requests whose compression took longer than the server's time limit
    needle_kept: bool = False  # verbatim in the final forwarded request
    needle_kept_before: bool = False  # verbatim in the request before the question (after the last step)
    needle_retrieved: bool = False  # lossless: behind a marker, handed back by one retrieve call
    retrieve_calls: int = 0
    retrieve_tokens: int = 0  # input tokens of the retrieve request(s)
    tool_definition_tokens: int = 0  # lossless: the retrieve tool's tokens over all requests
    markers_final: int = 0
    markers_unresolved: int = 0  # markers whose original the store no longer had
    final_index: int = -1  # the final request's position (a retrieve request may follow it)


class ChargedScorer:
    """The scorer, memoised and shared by the arms: ``stable``, ``lossless`` and ``eager`` decide
    each step on the same (query, units), and the final request's whole-history decision is
    nearly the same for all four ccproxy arms. Each arm is charged the seconds its scores took
    when first computed, so its compression time is what the product would spend.

    ``per_unit``: memoised per (query, unit) rather than per call. Exact for the dense encoder,
    whose score of a unit is its cosine to the query, whatever else the call holds; the product's
    default scorer (QR-head windows, fusion standardised within a call) is memoised per call."""

    def __init__(self, scorer: Any, call: str = "score", per_unit: bool = False) -> None:
        self._call = getattr(scorer, call)
        self.per_unit = per_unit
        self._calls: dict[tuple[str, tuple[str, ...]], tuple[list[float], float]] = {}
        self._units: dict[tuple[str, str], tuple[float, float]] = {}  # (query, unit) -> (score, seconds)
        self.computed_seconds = 0.0
        self.computed_units = 0
        self.computed_chars = 0

    def for_arm(self) -> ArmScorer:
        return ArmScorer(self)

    def _compute(self, query: str, units: list[str]) -> tuple[list[float], float]:
        started = time.perf_counter()
        scores = [float(x) for x in self._call(query, units)]
        seconds = time.perf_counter() - started
        self.computed_seconds += seconds
        self.computed_units += len(units)
        self.computed_chars += sum(map(len, units))
        return scores, seconds

    def score(self, query: str, units: Sequence[str]) -> tuple[list[float], float, float]:
        """(scores, seconds they took when computed, seconds spent now)."""
        if not self.per_unit:
            key = (query, tuple(units))
            found = self._calls.get(key)
            if found is not None:
                return found[0], found[1], 0.0
            scores, seconds = self._compute(query, list(units))
            self._calls[key] = (scores, seconds)
            return scores, seconds, seconds
        missing = list(dict.fromkeys(u for u in units if (query, u) not in self._units))
        spent = 0.0
        if missing:
            scores, spent = self._compute(query, missing)
            for unit, value in zip(missing, scores, strict=True):
                self._units[query, unit] = (value, spent / len(missing))
        found = [self._units[query, u] for u in units]
        return [value for value, _ in found], sum(seconds for _, seconds in found), spent


class ArmScorer:
    def __init__(self, shared: ChargedScorer) -> None:
        self.shared = shared
        self.charged = 0.0
        self.spent = 0.0

    async def __call__(self, query: str, units: Sequence[str], hint: object = None) -> list[float]:
        # The hint is not passed on: the scores are memoised and shared by arms that keep
        # different amounts, so every arm is charged the full pass.
        scores, charged, spent = await asyncio.to_thread(self.shared.score, query, units)
        self.charged += charged
        self.spent += spent
        return scores


@dataclass
class Arms:
    """The compressors of the ccproxy arms and what they share."""

    compressors: dict[str, Any]
    scorers: dict[str, ArmScorer]
    settings: Any
    counter: Any
    renderer: Renderer
    retrieve_tool: dict[str, Any]


def make_arms(scorer: ChargedScorer) -> Arms:
    from ccproxy.compression.gateway import ContextCompressor
    from ccproxy.lossless.chat import TOOL
    from ccproxy.settings import Settings
    from ccproxy.tokens import TiktokenCounter, tiktoken_encoding

    # Server defaults, but no time limit: a benchmark must not hide a slow scorer by failing open
    # (requests over the default limit are counted instead).
    base = Settings(compressor_timeout_s=3600)
    variants = {
        "rescore": {"compression_history": "rescore"},
        "stable": {"compression_history": "stable", "compression_mode": "lossy"},
        "lossless": {"compression_history": "stable", "compression_mode": "lossless"},
        "eager": {"compression_history": "stable", "compression_mode": "lossy",
                  "compression_keep_newest_tool_result": False},
    }
    scorers = {arm: scorer.for_arm() for arm in variants}
    compressors = {arm: ContextCompressor(scorers[arm], base.model_copy(update=update)) for arm, update in variants.items()}
    encoding = tiktoken_encoding("o200k_base")
    return Arms(compressors, scorers, base, TiktokenCounter(encoding), Renderer(encoding.encode_ordinary), TOOL)


def needle_in(messages: Sequence[dict[str, Any]], needle: str) -> bool:
    from ccproxy.tokens import content_text

    return any(needle in content_text(m.get("content")) for m in messages)


def truncate_oldest(messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]], target: int,
                    renderer: Renderer) -> list[dict[str, Any]]:
    """The oldest tool results replaced by TRUNCATED until the prompt has at most ``target``
    tokens; the system prompt, the task, the newest step and what follows it stay."""
    tool_indices = [i for i, m in enumerate(messages) if m.get("role") == "tool"]
    total = renderer.count(tools, messages)
    out = list(messages)
    for i in tool_indices[:-1]:
        if total <= target:
            break
        shortened = {**out[i], "content": TRUNCATED}
        total += len(renderer.message(shortened)) - len(renderer.message(out[i]))
        out[i] = shortened
    return out


async def run_trace(trace: Trace, arms: Arms, store_factory: Callable[[], Any]) -> dict[str, ArmRun]:
    from ccproxy.lossless.markers import Marking
    from ccproxy.protocol import CompressionControl
    from ccproxy.tokens import content_text

    final_messages = trace.messages()
    pristine = copy.deepcopy(final_messages)
    renderer = arms.renderer
    account = f"trace-{trace.number}"
    store = store_factory()
    runs = {arm: ArmRun(arm) for arm in ARMS}
    caches = {arm: PrefixCache() for arm in ARMS}
    previous: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]] | None] = {arm: None for arm in ARMS}
    sent: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    tool_tokens = len(renderer.tools([*trace.tools, arms.retrieve_tool])) - len(renderer.tools(trace.tools))
    timeout = type(arms.settings).model_fields["compressor_timeout_s"].default

    def book(arm: str, tools: list[dict[str, Any]], messages: list[dict[str, Any]]) -> None:
        run = runs[arm]
        prompt = renderer.prompt(tools, messages)
        run.prompt_tokens.append(len(prompt))
        run.cached_tokens.append(caches[arm](prompt))
        run.output_tokens.append(OUTPUT_TOKENS)
        before = previous[arm]
        if before is not None:
            run.extends_previous.append(before[0] == tools and messages[: len(before[1])] == before[1])
        previous[arm] = (tools, messages)
        sent[arm] = (tools, messages)

    for n in range(trace.n_requests):
        messages = trace.request(n, final_messages)
        tools = list(trace.tools)
        if n == trace.n_requests - 1:
            for arm in ARMS:  # the request before the question: what the steps left of the needle
                runs[arm].needle_kept_before = needle_in(sent[arm][1], trace.needle)
        book("none", tools, messages)
        for arm in CCPROXY_ARMS:
            compressor = arms.compressors[arm]
            plan = compressor.plan(CompressionControl())
            marking = Marking(plan.mode, account, store)  # as the Gateway makes it (ccproxy/serving.py)
            scorer = arms.scorers[arm]
            spent, charged = scorer.spent, scorer.charged
            started = time.perf_counter()
            # ``compress`` raises instead of failing open: a benchmark must not hide a failure.
            result = await compressor.compress(messages, plan, arms.counter, scope=account, elide=marking)
            seconds = time.perf_counter() - started - (scorer.spent - spent) + (scorer.charged - charged)
            run = runs[arm]
            run.compression_seconds += seconds
            run.slowest_seconds = max(run.slowest_seconds, seconds)
            run.over_timeout += seconds > timeout
            run.outcomes[result.outcome] = run.outcomes.get(result.outcome, 0) + 1
            sent_tools = list(tools)
            if plan.mode == "lossless" and result.outcome == "compressed" and marking.made:
                sent_tools.append(arms.retrieve_tool)  # what the Gateway adds (ccproxy/serving.py)
                run.tool_definition_tokens += tool_tokens
            book(arm, sent_tools, result.forwarded)
        book("truncate", tools, truncate_oldest(messages, tools, runs["stable"].prompt_tokens[-1], renderer))
    if final_messages != pristine:
        raise RuntimeError(f"trace {trace.number}: compression changed the client's messages")

    for arm in ARMS:
        run = runs[arm]
        tools, messages = sent[arm]
        run.final_index = len(run.prompt_tokens) - 1
        run.needle_kept = needle_in(messages, trace.needle)
        if arm != "lossless":
            continue
        refs = [ref for m in messages for ref in MARKER.findall(content_text(m.get("content")))]
        run.markers_final = len(refs)
        originals = {ref: store.get(account, ref) for ref in refs}
        run.markers_unresolved = sum(text is None for text in originals.values())
        if run.needle_kept:
            continue
        holder = next((ref for ref, text in originals.items() if text is not None and trace.needle in text), None)
        if holder is None:
            continue
        # The oracle model asks for the marker's original once; ccproxy answers the call itself
        # and sends the upstream one more request: the final one, the call and its result.
        call_id = "call_retrieve_0"
        extra = [
            *messages,
            {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
                "name": "ccproxy_retrieve", "arguments": json.dumps({"id": holder})}}]},
            {"role": "tool", "tool_call_id": call_id, "content": originals[holder]},
        ]
        book("lossless", tools, extra)
        run.retrieve_calls += 1
        run.retrieve_tokens += run.prompt_tokens[-1]
        run.tool_definition_tokens += tool_tokens
        run.needle_retrieved = True
    return runs


async def run_all(traces: Sequence[Trace], arms: Arms, store_factory: Callable[[], Any]) -> list[dict[str, ArmRun]]:
    results = []
    started = time.perf_counter()
    for trace in traces:
        runs = await run_trace(trace, arms, store_factory)
        results.append(runs)
        seconds = " ".join(f"{arm} {runs[arm].compression_seconds:.0f} s" for arm in CCPROXY_ARMS)
        kept = "".join("K" if runs[a].needle_kept or runs[a].needle_retrieved else "-" for a in ARMS)
        log(f"trace {trace.number + 1}/{len(traces)} ({trace.kind}, {len(trace.steps)} steps, needle in step "
            f"{trace.needle_step} [{trace.needle_kind}]): compression {seconds}; kept {kept} (arms {'/'.join(ARMS)}); "
            f"{time.perf_counter() - started:.0f} s in all, load {os.getloadavg()[0]:.2f}")
    return results


# --- report ----------------------------------------------------------------------------------


def keptshare(runs: Sequence[dict[str, ArmRun]], arm: str) -> float:
    return share([r[arm].needle_kept or r[arm].needle_retrieved for r in runs])


def saving(runs: Sequence[dict[str, ArmRun]], arm: str, profile: PriceProfile, *, cache: bool = True) -> float:
    return net_saving(sum(r[arm].bill(profile, cache=cache) for r in runs),
                      sum(r["none"].bill(profile, cache=cache) for r in runs))


def arm_totals(runs: Sequence[dict[str, ArmRun]], arm: str) -> dict[str, Any]:
    mine = [r[arm] for r in runs]
    prompt = sum(sum(r.prompt_tokens) for r in mine)
    none = sum(sum(r["none"].prompt_tokens) for r in runs)
    finals = [(r.prompt_tokens[r.final_index], r.cached_tokens[r.final_index]) for r in mine]
    return {
        "kept": keptshare(runs, arm),
        "kept_verbatim": share([r.needle_kept for r in mine]),
        "kept_before": share([r.needle_kept_before for r in mine]),
        "prompt_tokens": prompt,
        "vs_none": prompt / none - 1,
        "extends_previous": share([x for r in mine for x in r.extends_previous]),
        "cached_share": sum(sum(r.cached_tokens) for r in mine) / prompt,
        "uncached_tokens": prompt - sum(sum(r.cached_tokens) for r in mine),
        "final_cached_share": sum(c for _, c in finals) / sum(p for p, _ in finals),
        "final_extends": share([r.extends_previous[r.final_index - 1] for r in mine]),
        "retrieve_per_trace": sum(r.retrieve_calls for r in mine) / len(mine),
        "compression_seconds": sum(r.compression_seconds for r in mine),
        "slowest_seconds": max(r.slowest_seconds for r in mine),
        "over_timeout": sum(r.over_timeout for r in mine),
    }


def tables(runs: Sequence[dict[str, ArmRun]], traces: Sequence[Trace], seed: int) -> str:
    totals = {arm: arm_totals(runs, arm) for arm in ARMS}
    lines = [
        "| arm | needed output kept | …after the last step | input tokens | vs `none` | uncached input tokens "
        "| requests extending the previous one | cached share | final request: cached share "
        "| retrieve calls per trace | compression time (slowest request) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, t in totals.items():
        retrieve = f"{t['retrieve_per_trace']:.2f}" if arm == "lossless" else "—"
        kept = f"{t['kept']:.3f}"
        if arm == "lossless":
            kept += f" ({t['kept_verbatim']:.3f} verbatim)"
        timing = f"{t['compression_seconds']:.0f} s ({t['slowest_seconds']:.1f} s)" if arm in CCPROXY_ARMS else "—"
        lines.append(
            f"| `{arm}` | {kept} | {t['kept_before']:.3f} | {t['prompt_tokens']:,} | {t['vs_none']:+.1%} "
            f"| {t['uncached_tokens']:,} | {t['extends_previous']:.1%} | {t['cached_share']:.1%} "
            f"| {t['final_cached_share']:.1%} | {retrieve} | {timing} |"
        )
    header = ["arm"]
    for profile in PROFILES:
        header += [f"{profile.name}: bill, cache counted", f"{profile.name}: saving vs `none` (95 % CI)"]
    header += [f"{PROFILES[0].name}: saving, cache ignored"]
    lines += ["", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for arm in ARMS:
        cells = [f"`{arm}`"]
        for profile in PROFILES:
            cached = sum(r[arm].bill(profile) for r in runs)
            text = "—"
            if arm != "none":
                pairs = [(r["none"].bill(profile) - r[arm].bill(profile), r["none"].bill(profile)) for r in runs]
                low, high = bootstrap_ci(pairs, seed)
                text = f"{saving(runs, arm, profile):+.1%} ({low:+.1%} … {high:+.1%})"
            cells += [f"${cached:.3f}", text]
        cells.append("—" if arm == "none" else f"{saving(runs, arm, PROFILES[0], cache=False):+.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    # Per kind of trace, and short against long traces
    lengths = sorted(len(t.steps) for t in traces)
    middle = lengths[len(lengths) // 2]
    groups = {kind: [i for i, t in enumerate(traces) if t.kind == kind] for kind in sorted({t.kind for t in traces})}
    groups[f"< {middle} steps"] = [i for i, t in enumerate(traces) if len(t.steps) < middle]
    groups[f"≥ {middle} steps"] = [i for i, t in enumerate(traces) if len(t.steps) >= middle]
    groups = {name: members for name, members in groups.items() if members}
    header = ["arm"] + [f"{name}: {what}" for name in groups for what in ("kept", f"saving ({PROFILES[-1].name})")]
    lines += ["", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for arm in ARMS:
        cells = [f"`{arm}`"]
        for members in groups.values():
            mine = [runs[i] for i in members]
            cells += [f"{keptshare(mine, arm):.3f}", "—" if arm == "none" else f"{saving(mine, arm, PROFILES[-1]):+.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_lines(runs: Sequence[dict[str, ArmRun]]) -> list[str]:
    lines = []
    for arm in COMPRESSED_ARMS:
        kept = keptshare(runs, arm)
        savings = {p.name: saving(runs, arm, p) for p in PROFILES}
        worst = min(savings.values())
        misses = []
        if worst < GOAL_SAVING:
            short = [f"{name} by {GOAL_SAVING - value:.1%} points" for name, value in savings.items() if value < GOAL_SAVING]
            misses.append("saving under 50 % (" + ", ".join(short) + ")")
        if kept < GOAL_KEPT:
            misses.append(f"kept {kept:.3f} < {GOAL_KEPT} (short by {GOAL_KEPT - kept:.3f})")
        verdict = "**met**" if not misses else "**missed**: " + "; ".join(misses)
        lines.append(f"- `{arm}`: saving {', '.join(f'{n} {v:+.1%}' for n, v in savings.items())}; "
                     f"kept {kept:.3f} — {verdict}")
    return lines


def lossless_cost(runs: Sequence[dict[str, ArmRun]]) -> str:
    profile = PROFILES[0]
    calls = sum(r["lossless"].retrieve_calls for r in runs)
    retrieve_tokens = sum(r["lossless"].retrieve_tokens for r in runs)
    definition = sum(r["lossless"].tool_definition_tokens for r in runs)
    extra_bill = sum(session_cost(r["lossless"].requests()[r["lossless"].final_index + 1 :], profile) for r in runs)
    unresolved = sum(r["lossless"].markers_unresolved for r in runs)
    markers = sum(r["lossless"].markers_final for r in runs)
    against = ", ".join(
        f"{p.name} {-net_saving(sum(r['lossless'].bill(p) for r in runs), sum(r['stable'].bill(p) for r in runs)):+.1%}"
        for p in PROFILES
    )
    return (
        f"Lossless's price for keeping everything: {calls} retrieve call(s) in {len(runs)} traces "
        f"({calls / len(runs):.2f} per trace), {retrieve_tokens:,} input tokens in those extra requests "
        f"(${extra_bill:.3f} of the {profile.name} bill; each extends the final request, so it is mostly cached), "
        f"the `ccproxy_retrieve` tool definition's {definition:,} tokens over the requests that carried markers, and "
        f"the markers themselves in place of the lossy notes. Its bill against `stable`'s: {against}. The final "
        f"requests held {markers:,} markers; {unresolved} of them could no longer be resolved from the store."
    )


def report(command: str, options: argparse.Namespace, traces: Sequence[Trace], runs: Sequence[dict[str, ArmRun]],
           wall_seconds: float, loads: tuple[tuple[float, ...], tuple[float, ...]], scorer_name: str,
           memo: tuple[int, int], tree: str, scorer: ChargedScorer) -> str:
    from bench.compressor_bench import cpu_name

    steps = [len(t.steps) for t in traces]
    none_final = [r["none"].prompt_tokens[-1] for r in runs]
    per_request = sum(sum(r["none"].prompt_tokens) for r in runs) / sum(len(r["none"].prompt_tokens) for r in runs)
    kinds = {kind: sum(t.kind == kind for t in traces) for kind in ("coding", "research")}
    needle_kinds: dict[str, int] = {}
    for t in traces:
        needle_kinds[t.needle_kind] = needle_kinds.get(t.needle_kind, 0) + 1
    cores = os.cpu_count() or 1
    busy = max(loads[0][0], loads[1][0]) > 0.75 * cores
    profiles = "; ".join(
        f"**{p.name}**: ${p.input:.2f} / M input, ${p.cached_input:.2f} cached, ${p.output:.2f} output"
        + (f", ${p.cache_write:.2f} cache write" if p.cache_write is not None else "")
        for p in PROFILES
    )
    outcomes: dict[str, dict[str, int]] = {arm: {} for arm in CCPROXY_ARMS}
    for r in runs:
        for arm in outcomes:
            for outcome, count in r[arm].outcomes.items():
                outcomes[arm][outcome] = outcomes[arm].get(outcome, 0) + count
    outcome_text = "; ".join(
        f"`{arm}` " + ", ".join(f"{name} {count:,}" for name, count in sorted(counts.items()))
        for arm, counts in outcomes.items()
    )
    totals = {arm: arm_totals(runs, arm) for arm in ARMS}
    from ccproxy.settings import Settings

    timeout = Settings.model_fields["compressor_timeout_s"].default
    over = ", ".join(f"`{arm}` {totals[arm]['over_timeout']}" for arm in CCPROXY_ARMS)
    stable, none = totals["stable"], totals["none"]
    rescore_idle = outcomes["rescore"].get("nothing_to_drop", 0) + outcomes["rescore"].get("below_threshold", 0)
    parts = [
        "## Agent traces: compression, prompt caching and the bill",
        "",
        f"Command: `{command}`",
        "",
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu_name()} ({cores} cores), "
        f"{wall_seconds / 60:.1f} min in all, of which scoring {scorer.computed_seconds / 60:.1f} min "
        f"({scorer.computed_units:,} units, {scorer.computed_chars / 1e6:.1f} M characters); load average "
        f"{loads[0][0]:.2f} / {loads[0][1]:.2f} / {loads[0][2]:.2f} at the start, {loads[1][0]:.2f} / {loads[1][1]:.2f} "
        f"/ {loads[1][2]:.2f} at the end"
        + (" (the machine was busy with other work: the times are inflated)" if busy else "")
        + f". Traces built from {tree}, seed {options.seed}; scorer: {scorer_name}.",
        "",
        f"{len(traces)} agent traces ({kinds['coding']} coding, {kinds['research']} research) of {min(steps)}–{max(steps)} "
        f"tool steps (lengths spread log-uniformly; {sum(t.n_requests for t in traces):,} requests in all). Coding traces read "
        "windows of this repository's files, grep it (hits as `path:line: text` lines or as one JSON array) and show "
        "pieces of a real `pytest tests/unit -v` log (`bench/data/pytest_log.txt`); research traces search (a JSON "
        "array of results) and open pages of NQ passages (evaluation part, lines 500–999). Every step is a request "
        "that resends the history; after the last step the agent reports back and the user asks one question whose "
        "answer lies in exactly one earlier tool result (needles: "
        + ", ".join(f"{k} {v}" for k, v in sorted(needle_kinds.items()))
        + f"). `none` sends {per_request:,.0f} input tokens per request on average, "
        f"{sum(none_final) / len(none_final):,.0f} in the final ones (at most {max(none_final):,}).",
        "",
        "Arms, over the same requests in one run: `none` (forwarded as is); `rescore` "
        "(`CCPROXY_COMPRESSION_HISTORY=rescore`: no history memo, the whole conversation decided against the newest "
        "user message); `stable` (the server defaults: history memo, agent steps on, tool results of 2,000+ "
        "characters cut to ratio 0.5 against the task once the model has read them, the newest step whole, lossy "
        "notes); `lossless` (`stable` with `CCPROXY_COMPRESSION_MODE=lossless`: retrievable markers, the "
        "`ccproxy_retrieve` tool added to each request that carries markers, and an oracle model that calls it once "
        "on the final request when the needle is only behind a marker); `eager` (not in the issue's list: `stable` "
        "with `CCPROXY_COMPRESSION_KEEP_NEWEST_TOOL_RESULT=false`, each result cut on the request that brings it, so "
        "the model never reads the newest result whole); `truncate` (the oldest tool results replaced by "
        f"`{TRUNCATED}` until the request is no longer than `stable`'s; system prompt, task and newest step kept). "
        "Compression is the product's `ContextCompressor` in-process with the server defaults (no time limit: "
        f"requests whose compression took longer than the default {timeout:.0f} s, which would have been forwarded "
        f"uncompressed in production on this CPU: {over}). Scores of the same (query, units) are computed once and "
        "shared by the arms, each arm charged their original time. Memo (`stable`, `lossless`, `eager`): "
        f"{memo[0]:,} segment look-ups answered, {memo[1]:,} missed. Outcomes per request: {outcome_text}.",
        "",
        "Tokens: tiktoken o200k over the rendered request (`bench/cost_model.py`'s framing, plus the tool definitions "
        "as one block before the messages and each tool call's name and arguments). Cache: OpenAI's rule as in "
        "`bench/cost_model.py` (longest prefix shared with an earlier request of the trace, in 128-token blocks, "
        f"none under 1,024). Output: {OUTPUT_TOKENS} tokens per request. Prices, as assumptions: {profiles}.",
        "",
        tables(runs, traces, options.seed),
        "",
        "Columns: needed output kept = the share of traces whose needle is verbatim in the final forwarded request "
        "(`lossless`: or handed back by a retrieve call); …after the last step = the same in the request before the "
        "question (what step compression left); uncached input tokens = input tokens billed at the full price; "
        "requests extending the previous one = the request starts with the previous request's tools and messages "
        "byte for byte; cached share = input tokens billed as cached; compression time = time in "
        "`ContextCompressor.compress` on this CPU, scoring included. Savings: the bill with caching counted against "
        "`none`'s (95 % bootstrap intervals over traces); the last table splits the traces by kind and by length "
        f"(savings there: {PROFILES[-1].name}).",
        "",
        f"Goal (issue 17): ≥ {GOAL_SAVING:.0%} lower bill with caching counted and needed output kept ≥ {GOAL_KEPT}:",
        "",
        *goal_lines(runs),
        "",
        lossless_cost(runs),
        "",
        "Reading it:",
        "",
        f"- `stable` forwards {stable['vs_none']:+.1%} input tokens against `none`, yet "
        f"{stable['uncached_tokens']:,} of them are uncached against `none`'s {none['uncached_tokens']:,}: only "
        f"{stable['extends_previous']:.1%} of its requests extend the previous one. The newest step is forwarded "
        "whole and cut on the next request, so each request rewrites the step before it and the cache stops there: "
        "a long result is paid uncached twice, whole and then cut. Its saving with the cache ignored is "
        f"{saving(runs, 'stable', PROFILES[0], cache=False):+.1%} ({PROFILES[0].name}); counted, "
        + ", ".join(f"{saving(runs, 'stable', p):+.1%} ({p.name})" for p in PROFILES)
        + ". `eager` cuts each result on arrival and stays append-only "
        f"({totals['eager']['extends_previous']:.1%} of its requests extend the previous one): what the "
        "cache-friendly order is worth, at the price of the model never reading a long result whole.",
        "- The final question is a new user turn: `ccproxy.compression.history.turn_bounds` cuts agent steps only "
        "after the last user message, so the finished agent loop becomes one ordinary segment decided against the "
        "question, whole tool exchanges kept or dropped, from the original messages (the step decisions are not "
        "reused). The final request therefore shares little with the previous one (cached share of final requests: "
        f"`stable` {stable['final_cached_share']:.1%}, `none` {none['final_cached_share']:.1%}), and the needle's "
        f"fate is that one decision: `stable` had {stable['kept_before']:.3f} of the needles after the last step "
        f"and {stable['kept']:.3f} in the final request.",
        f"- `rescore` has nothing to drop until the final request ({rescore_idle:,} of its "
        f"{sum(outcomes['rescore'].values()):,} requests forwarded untouched): without a memo the conversation is "
        "one segment, and everything after the task is the turn in progress, which is protected; on the final "
        "request it decides the whole history (the task included) against the question, and that request misses "
        "the cache.",
        f"- `lossless` made {sum(r['lossless'].retrieve_calls for r in runs)} retrieve call(s): "
        + ("the final decision kept every needle verbatim, so what it costs here is its markers and the tool "
           "definition." if not any(r["lossless"].retrieve_calls for r in runs) else
           "each one a request more, mostly cached."),
        f"- `truncate` replaces one more old result whenever the history outgrows `stable`'s size, and each time "
        f"the request misses the cache from that result on ({1 - totals['truncate']['extends_previous']:.1%} of its "
        f"requests do not extend the previous one); a needle in a truncated result is lost (kept "
        f"{totals['truncate']['kept']:.3f}).",
    ]
    return "\n".join(parts) + "\n"


def trace_json(trace: Trace, runs: dict[str, ArmRun]) -> dict[str, Any]:
    return {
        "trace": trace.number,
        "kind": trace.kind,
        "steps": len(trace.steps),
        "needle_step": trace.needle_step,
        "needle_kind": trace.needle_kind,
        "needle": trace.needle[:200],
        "question": trace.question,
        "arms": {
            arm: {
                "needle_kept": run.needle_kept,
                "needle_kept_after_steps": run.needle_kept_before,
                "needle_retrieved": run.needle_retrieved,
                "prompt_tokens": sum(run.prompt_tokens),
                "cached_tokens": sum(run.cached_tokens),
                "final_prompt_tokens": run.prompt_tokens[run.final_index],
                "final_cached_tokens": run.cached_tokens[run.final_index],
                "extends_previous": share(run.extends_previous),
                "outcomes": run.outcomes,
                "compression_seconds": round(run.compression_seconds, 2),
                "retrieve_calls": run.retrieve_calls,
                "bill": {p.name: round(run.bill(p), 6) for p in PROFILES},
            }
            for arm, run in runs.items()
        },
    }


def load_scorer_named(name: str) -> tuple[ChargedScorer, str]:
    from ccproxy.settings import Settings

    settings = Settings()
    if name == "dense":
        from ccproxy.compression.dense import load_dense_encoder
        from ccproxy.compression.model import default_dtype

        encoder = load_dense_encoder(default_dtype("cpu"))
        return ChargedScorer(encoder, "scores", per_unit=True), (
            "the dense encoder alone (all-MiniLM-L6-v2 as `ccproxy.compression.dense` runs it, "
            f"{str(encoder.model.dtype).removeprefix('torch.')}; the product's default scorer, QR heads + MiniLM, "
            "is too slow for this many tokens on 2 CPU cores)"
        )
    from ccproxy.compression.scoring import load_scorer

    return ChargedScorer(load_scorer(settings)), (
        f"the product's default (`load_scorer`: QR heads of the embedded SmolLM2-135M, `CCPROXY_SCORING_MODE="
        f"{settings.scoring_mode}` with MiniLM)"
    )


def tree_state(revision: str | None = None) -> str:
    """Which files the coding traces were cut from, in words a rerun can use (``--corpus-rev``)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    if revision is not None:
        return f"the files at {git('rev-parse', '--short', revision)} (`--corpus-rev`)"
    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *CORPUS_DIRS)
    return f"the working tree at {commit}" + (" (with uncommitted edits)" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=int, default=30)
    parser.add_argument("--min-steps", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--scorer", choices=("default", "dense"), default="dense",
                        help="default: the product's load_scorer (QR heads + MiniLM); dense: MiniLM alone")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for scoring (CCPROXY_COMPRESSOR_THREADS's role; default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 traces of 20 steps")
    parser.add_argument("--no-docs", action="store_true", help="write bench/results only, not docs/")
    parser.add_argument("--corpus-rev", metavar="REV", help=CORPUS_REV_HELP)
    args = parser.parse_args(argv)
    if args.quick:
        args.traces, args.min_steps, args.max_steps = 3, 20, 20
    if not 1 <= args.min_steps <= args.max_steps or args.traces < 1:
        parser.error("need 1 <= --min-steps <= --max-steps and --traces >= 1")
    command = "python -m bench.agent_traces" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    load_start = os.getloadavg()
    log(f"load average at the start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
        f"({os.cpu_count()} cores)")
    traces = build_traces(args.traces, args.min_steps, args.max_steps, args.seed,
                          corpus=repo_corpus(revision=args.corpus_rev))
    log(f"{len(traces)} traces of {min(len(t.steps) for t in traces)}-{max(len(t.steps) for t in traces)} steps, "
        f"{sum(t.n_requests for t in traces)} requests; built in {time.perf_counter() - started:.0f} s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    scorer, scorer_name = load_scorer_named(args.scorer)
    arms = make_arms(scorer)

    from ccproxy.retrieval import RetrievalStore

    runs = asyncio.run(run_all(traces, arms, lambda: RetrievalStore.from_settings(arms.settings)))
    memos = [arms.compressors[a].history_memo for a in ("stable", "lossless", "eager")]
    memo = (sum(m.hits for m in memos), sum(m.misses for m in memos))
    load_end = os.getloadavg()
    log(f"load average at the end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    section = report(command, args, traces, runs, time.perf_counter() - started, (load_start, load_end), scorer_name,
                     memo, tree_state(args.corpus_rev), scorer)
    RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_MD.write_text(section, encoding="utf-8")
    RESULTS_JSON.write_text(json.dumps([trace_json(t, r) for t, r in zip(traces, runs)], indent=1) + "\n",
                            encoding="utf-8")
    if not args.no_docs:
        from bench.load import write_section

        write_section(f"{MARKS[0]}\n{section}{MARKS[1]}\n", BENCHMARKS_MD, MARKS)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
