"""The agent-trace benchmark's traces (bench/agent_traces.py): their shape, their needles, and
the cache arithmetic the bill rests on. Cheap: no scoring."""

from __future__ import annotations

import json
import random

import pytest

from bench import agent_traces
from bench.cost_model import session_cache
from nqdata.items import DATA_FILE


@pytest.fixture(scope="module")
def traces() -> list[agent_traces.Trace]:
    if not DATA_FILE.exists():
        pytest.skip(f"the NQ file is not here ({DATA_FILE})")
    return agent_traces.build_traces(2, 20, 20, seed=5)


def test_two_quick_traces_a_coding_and_a_research_one(traces) -> None:
    assert [t.kind for t in traces] == ["coding", "research"]
    for trace in traces:
        assert 20 <= len(trace.steps) <= 120
        assert trace.n_requests == len(trace.steps) + 2


def test_each_trace_is_an_agent_loop_that_ends_with_a_question(traces) -> None:
    for trace in traces:
        messages = trace.messages()
        assert [m["role"] for m in messages[:2]] == ["system", "user"]
        names = {tool["function"]["name"] for tool in trace.tools}
        for k in range(len(trace.steps)):
            call, result = messages[2 + 2 * k], messages[3 + 2 * k]
            assert call["role"] == "assistant" and len(call["tool_calls"]) == 1
            assert call["tool_calls"][0]["function"]["name"] in names
            json.loads(call["tool_calls"][0]["function"]["arguments"])
            assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": trace.steps[k].output}
        assert messages[-2]["role"] == "assistant" and not messages[-2].get("tool_calls")
        assert messages[-1] == {"role": "user", "content": trace.question}
        # Request n holds the steps before it; the last one is the whole trace.
        assert len(trace.request(0)) == 2 and len(trace.request(5)) == 12
        assert trace.request(trace.n_requests - 1) == messages


def test_the_needle_lies_in_exactly_one_earlier_tool_result(traces) -> None:
    for trace in traces:
        assert len(trace.needle) >= 20
        assert trace.tool_results_holding_needle() == [trace.needle_step]
        assert trace.needle not in trace.task and trace.needle not in trace.question and trace.needle not in trace.system


def test_tool_results_come_as_text_and_as_json_arrays(traces) -> None:
    outputs = [step.output for trace in traces for step in trace.steps]
    arrays = [o for o in outputs if o.startswith("[") and isinstance(json.loads(o), list)]
    assert arrays and len(arrays) < len(outputs)
    research = traces[1]
    assert {step.name for step in research.steps} == {"search", "open_page"}


def test_the_same_seed_builds_the_same_traces(traces) -> None:
    again = agent_traces.build_traces(2, 20, 20, seed=5)
    assert [(t.task, t.steps, t.needle) for t in again] == [(t.task, t.steps, t.needle) for t in traces]


def test_lengths_span_the_range() -> None:
    lengths = agent_traces.step_counts(30, 20, 120)
    assert lengths[0] == 20 and lengths[-1] == 120 and lengths == sorted(lengths) and len(lengths) == 30


def test_the_prefix_cache_matches_the_cost_model() -> None:
    rng = random.Random(3)
    base = [rng.randrange(1000) for _ in range(3000)]
    prompts = [base[:1100], base[:2000], base[:1500] + [7] * 900, base[:2500], [1] + base[:2999], base]
    cache = agent_traces.PrefixCache()
    assert [cache(p) for p in prompts] == session_cache(prompts)


def test_truncate_oldest_keeps_the_task_and_the_newest_step() -> None:
    renderer = agent_traces.Renderer(lambda text: [len(word) for word in text.split()])
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "task"}]
    for k in range(4):
        call = {"id": f"c{k}", "type": "function", "function": {"name": "grep", "arguments": "{}"}}
        messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": f"c{k}", "content": "word " * 100}]
    target = renderer.count([], messages) - 150
    out = agent_traces.truncate_oldest(messages, [], target, renderer)
    assert renderer.count([], out) <= target
    assert [m["content"] for m in out if m["role"] == "tool"][:2] == [agent_traces.TRUNCATED] * 2
    assert out[-1] == messages[-1] and out[:2] == messages[:2]


def test_a_corpus_revision_reads_the_committed_files_not_the_working_tree(tmp_path) -> None:
    """The coding traces are cut from the repository's files: ``--corpus-rev`` pins them, so a
    rerun after the code changed cuts the same traces."""
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "ccproxy").mkdir()
    source = tmp_path / "ccproxy" / "a.py"
    source.write_text("def committed():\n    return 1\n", encoding="utf-8")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "one")
    source.write_text("def edited():\n    return 2\n", encoding="utf-8")

    [on_disk] = agent_traces.repo_corpus(tmp_path)
    [pinned] = agent_traces.repo_corpus(tmp_path, revision="HEAD")
    assert on_disk.path == pinned.path == "ccproxy/a.py"
    assert on_disk.lines[0] == "def edited():" and pinned.lines[0] == "def committed():"
    with pytest.raises(SystemExit, match="not in this clone's history"):
        agent_traces.repo_corpus(tmp_path, revision="no-such-revision")
