"""The cache-stable history policy (ccproxy.compression.history) with a lexical fake scorer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from ccproxy.compression.gateway import ContextCompressor
from ccproxy.adapters import chat as chat_wire
from ccproxy.compression.history import HistoryMemo
from ccproxy.compression.history import turn_bounds as turn_bounds_of_turns
from ccproxy.compression.pipeline import SEGMENTS_IN_FLIGHT, Compression, CompressionPlan, compress_wire
from ccproxy.protocol import CompressionControl
from ccproxy.settings import Settings
from tests.unit.test_pipeline import compress_messages, overlap_score, plan, rag_messages, words

TOPICS = ["zurich", "volcano", "penguin", "railway", "opera", "glacier", "comet", "harbor", "orchard", "cathedral",
          "desert", "lantern"]


def turn(k: int) -> str:
    """A RAG turn: three documents, one about this turn's topic, then the question."""
    topic = TOPICS[k]
    documents = [
        f"Document {d}: " + " ".join(f"{TOPICS[(k + d) % len(TOPICS)]} filler{k}x{d}x{j}" for j in range(12))
        for d in range(3)
    ]
    return "\n\n".join([*documents, f"Question: what about the {topic} {TOPICS[(k + 1) % len(TOPICS)]}?"])


def chat(n_turns: int, *, last_reply: bool = False) -> list[dict]:
    """System prompt, then n user turns with an assistant reply between them."""
    messages: list[dict] = [{"role": "system", "content": "Answer from the documents."}]
    for k in range(n_turns):
        if k:
            messages.append({"role": "assistant", "content": f"The {TOPICS[k - 1]} answer is {k}."})
        messages.append({"role": "user", "content": turn(k)})
    if last_reply:
        messages.append({"role": "assistant", "content": f"The {TOPICS[n_turns - 1]} answer is {n_turns}."})
    return messages


def turn_bounds(messages: list[dict]) -> list[tuple[int, int]]:
    return turn_bounds_of_turns(chat_wire.parse(messages).turns)


def compress_stable(messages: list[dict], compression_plan: CompressionPlan, **options):
    """The ``stable`` policy: the pipeline with a memo."""
    return compress_wire(chat_wire.FORMAT, messages, compression_plan, **options)


class CountingScorer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, query: str, units: Sequence[str], hint: object = None) -> list[float]:
        self.calls.append(query)
        return await overlap_score(query, units)


def stable(
    messages: list[dict], compression_plan: CompressionPlan, memo: HistoryMemo, score=overlap_score
) -> Compression:
    return asyncio.run(compress_stable(messages, compression_plan, count_tokens=words, score=score, memo=memo))


def rescore(messages: list[dict], compression_plan: CompressionPlan) -> Compression:
    return asyncio.run(compress_messages(messages, compression_plan, count_tokens=words, score=overlap_score))


def starts_with(longer: list[dict], shorter: list[dict]) -> bool:
    return longer[: len(shorter)] == shorter


def test_turn_bounds() -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "r"},
    ]
    assert turn_bounds(messages) == [(0, 2), (2, 6)]
    assert turn_bounds(messages[:3]) == [(0, 3)]
    assert turn_bounds([{"role": "system", "content": "s"}]) == [(0, 1)]
    # Documents in one user message and the question in the next: one turn, never split.
    documents_then_question = [messages[0], messages[1], {"role": "user", "content": "q"}]
    assert turn_bounds(documents_then_question) == [(0, 3)]
    assert turn_bounds(documents_then_question + messages[2:4] + messages[3:4]) == [(0, 3), (3, 6)]


def test_documents_sent_apart_from_the_question_are_still_compressed() -> None:
    *system_and_documents, question = rag_messages()[1]["content"].rsplit("\n\n", 1)
    messages = [rag_messages()[0], {"role": "user", "content": system_and_documents[0]},
                {"role": "user", "content": question}]
    result = stable(messages, plan(), HistoryMemo())
    assert result.outcome == "compressed"
    assert result.tokens_after < result.tokens_before
    assert "treaty of zurich was signed in 1859" in result.forwarded[1]["content"]  # scored against q


def test_each_request_starts_with_what_the_previous_one_forwarded() -> None:
    compression_plan = plan(ratio=0.4, threshold_tokens=50)
    memo = HistoryMemo()
    forwarded = [stable(chat(n), compression_plan, memo).forwarded for n in range(1, 11)]
    for n in range(1, 10):
        previous, current = forwarded[n - 1], forwarded[n]
        assert starts_with(current, previous), f"turn {n + 1} rewrote the history"
        assert current[len(previous)]["role"] == "assistant"  # then the reply (if kept) and the new turn
    final = stable(chat(10), compression_plan, HistoryMemo())
    assert final.outcome == "compressed" and final.tokens_after < final.tokens_before
    # The same chat under today's policy rewrites earlier turns, which is what busts the cache.
    rescored = [rescore(chat(n), compression_plan).forwarded for n in range(1, 11)]
    assert not all(starts_with(rescored[n], rescored[n - 1]) for n in range(1, 10))


def test_a_turn_is_compressed_against_its_own_question() -> None:
    compression_plan = plan(ratio=0.4, threshold_tokens=50)
    forwarded = stable(chat(4), compression_plan, HistoryMemo()).forwarded
    first_turn = forwarded[1]["content"]
    assert "Document 0: zurich filler" in first_turn  # the document on turn 0's topic
    assert first_turn.endswith("Question: what about the zurich volcano?")  # questions are never dropped


def test_a_single_turn_request_is_compressed_exactly_as_rescore_does() -> None:
    for compression_plan in (plan(), plan(ratio=None, budget_tokens=120), plan(threshold_tokens=100_000)):
        for messages in (rag_messages(), chat(1)):
            memo = HistoryMemo()
            assert stable(messages, compression_plan, memo) == rescore(messages, compression_plan)


def test_memo_scores_only_the_newest_turn() -> None:
    compression_plan = plan(ratio=0.4, threshold_tokens=0)
    memo = HistoryMemo()
    scorer = CountingScorer()
    first = stable(chat(9), compression_plan, memo, scorer)
    assert (memo.hits, memo.misses, len(scorer.calls)) == (0, 9, 9)
    again = stable(chat(9), compression_plan, memo, scorer)
    assert again == first
    assert (memo.hits, memo.misses, len(scorer.calls)) == (9, 9, 9)
    stable(chat(10), compression_plan, memo, scorer)
    assert (memo.hits, memo.misses) == (18, 10)
    assert scorer.calls[-1].endswith(f"{TOPICS[9]} {TOPICS[10]}?")  # only turn 10's question was asked
    # Another plan is another decision, never a stale one.
    stable(chat(10), plan(ratio=0.6, threshold_tokens=0), memo, scorer)
    assert memo.misses == 20


def test_one_account_never_reads_another_accounts_memo() -> None:
    """Byte-identical chats of two accounts are decided apart: a shared entry would tell one
    account (by timing) what another sent, and mix their decisions."""
    memo = HistoryMemo()
    compression_plan = plan(threshold_tokens=0)
    for scope in ("acct_a", "acct_b"):
        asyncio.run(
            compress_stable(chat(4), compression_plan, count_tokens=words, score=overlap_score, memo=memo, scope=scope)
        )
    assert (memo.hits, memo.misses) == (0, 8)
    asyncio.run(
        compress_stable(chat(4), compression_plan, count_tokens=words, score=overlap_score, memo=memo, scope="acct_a")
    )
    assert (memo.hits, memo.misses) == (4, 8)


def test_memo_is_bounded_and_holds_no_message_text() -> None:
    memo = HistoryMemo(max_entries=3)
    stable(chat(6), plan(threshold_tokens=0), memo)
    assert len(memo) == 3
    assert "zurich" not in repr(list(memo._entries))


def test_decisions_do_not_depend_on_the_memo() -> None:
    """A restarted or different worker (empty memo) forwards exactly what a warm one does."""
    compression_plan = plan(ratio=0.3, threshold_tokens=50)
    warm = HistoryMemo()
    for n in range(1, 8):
        stable(chat(n), compression_plan, warm)
    assert stable(chat(8), compression_plan, warm) == stable(chat(8), compression_plan, HistoryMemo())


def test_the_threshold_is_on_the_raw_chat_so_far() -> None:
    messages = chat(3)
    below = stable(messages, plan(threshold_tokens=100_000), HistoryMemo())
    assert below.outcome == "below_threshold" and below.forwarded is messages
    assert below.tokens_before == below.tokens_after == sum(u.tokens for u in below.units)
    # Turn 0 alone is under the threshold, so it is forwarded whole; later turns are compressed.
    turn_0_tokens = rescore(chat(1), plan()).tokens_before
    mixed = stable(messages, plan(ratio=0.2, threshold_tokens=turn_0_tokens + 1), HistoryMemo())
    assert mixed.outcome == "compressed"
    assert mixed.forwarded[:2] == messages[:2]
    assert mixed.forwarded[3] != messages[3]


def test_reports_and_token_counts_add_up() -> None:
    result = stable(chat(6), plan(ratio=0.4, threshold_tokens=50), HistoryMemo())
    assert [u.index for u in result.units] == list(range(len(result.units)))
    assert result.tokens_before == sum(u.tokens for u in result.units)
    assert result.tokens_after == sum(u.kept_tokens for u in result.units)
    forwarded_words = sum(len(str(m["content"]).split()) for m in result.forwarded)
    assert forwarded_words == result.tokens_after  # words() counts what is forwarded exactly


def test_a_budget_counts_the_history_and_stays_a_hard_cap() -> None:
    compression_plan = plan(ratio=None, budget_tokens=300, threshold_tokens=0)
    memo = HistoryMemo()
    results = [stable(chat(n), compression_plan, memo) for n in range(1, 11)]
    assert all(result.tokens_after <= 300 for result in results)
    # Turn 4 (about 355 words) fits by compressing its own turn only, the history left as sent...
    assert results[3].tokens_before > 300
    assert starts_with(results[3].forwarded, results[2].forwarded)
    assert results[3] != rescore(chat(4), compression_plan)
    # ...by turn 10 the history's stable form alone is over the budget: that request is rescored.
    assert results[9] == rescore(chat(10), compression_plan)


def test_the_turn_in_progress_is_kept_and_joins_the_next_segment_afterwards() -> None:
    function = {"name": "lookup", "arguments": "{}"}
    call = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": function}]}
    result_message = {"role": "tool", "tool_call_id": "c1", "content": "zurich volcano penguin " * 20}
    messages = [*chat(3), call, result_message]
    result = stable(messages, plan(ratio=0.2, threshold_tokens=0), HistoryMemo())
    assert result.forwarded[-2:] == [call, result_message]


def test_the_gateway_picks_the_policy_from_the_settings() -> None:
    messages = chat(6)
    expectations = {"stable": stable(messages, plan(), HistoryMemo()), "rescore": rescore(messages, plan())}
    for policy, expected in expectations.items():
        settings = Settings(compression_history=policy, compression_ratio=0.2, compression_threshold_tokens=100)
        compressor = ContextCompressor(overlap_score, settings)
        result = asyncio.run(compressor.compress(messages, compressor.plan(CompressionControl()), words))
        assert result == expected
        assert (compressor.history_memo.misses > 0) == (policy == "stable")
    assert stable(messages, plan(), HistoryMemo()) != rescore(messages, plan())


@pytest.mark.parametrize("policy", ["stable", "rescore"])
def test_the_history_setting_reads_the_environment(monkeypatch: pytest.MonkeyPatch, policy: str) -> None:
    monkeypatch.setenv("CCPROXY_COMPRESSION_HISTORY", policy)
    assert Settings().compression_history == policy


class SlowScorer:
    """Counts the scorer calls started and the most at once; each takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = 0
        self.running = 0
        self.most = 0

    async def __call__(self, query: str, units: Sequence[str], hint: object = None) -> list[float]:
        self.started += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.seconds)
            return await overlap_score(query, units)
        finally:
            self.running -= 1


def test_a_new_long_chat_is_scored_a_few_turns_at_a_time() -> None:
    compression_plan = plan(ratio=0.4, threshold_tokens=0)
    messages = chat(12) * 3  # 34 turns (each copy's last question runs into the next copy), none seen
    n_turns = len(turn_bounds(messages))
    scorer = SlowScorer(0.001)
    bounded = stable(messages, compression_plan, HistoryMemo(), scorer)
    assert scorer.started == n_turns and scorer.most == SEGMENTS_IN_FLIGHT < n_turns
    assert bounded == stable(messages, compression_plan, HistoryMemo())  # the same decisions


def test_turns_not_yet_sent_to_the_scorer_are_dropped_when_the_gateway_gives_up() -> None:
    scorer = SlowScorer(0.2)

    async def timed_out() -> None:
        work = compress_stable(chat(12) * 3, plan(threshold_tokens=0), count_tokens=words, score=scorer,
                               memo=HistoryMemo())
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(work, timeout=0.05)
        await asyncio.sleep(0.5)  # long enough for every call to have started, were any left queued

    asyncio.run(timed_out())
    assert scorer.started == SEGMENTS_IN_FLIGHT
