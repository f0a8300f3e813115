"""The retrieve loop of lossless mode: ccproxy answers the model's ``ccproxy_retrieve`` calls
itself and continues the upstream conversation, so the client never sees the tool.

One request may take up to ``max_rounds`` extra upstream calls. Whole answers are read and
re-asked; a streamed answer is relayed as it comes except for the events of ccproxy's own
calls and the events that end the answer, which are held until the round is over: then
either the next round's stream is spliced on (``Splicer``) or the held events go out. What
the client sees is one answer, its usage the sum of every round's (that is what the provider
bills). Retrieved text goes into the continuation as the tool's result and is never
compressed again. An answer that calls ccproxy's tool beside the client's own tools, or after
the last round, loses ccproxy's calls: the client gets its own calls, or the text, alone.

Each API's wire shapes live in a ``Dialect`` (``ccproxy/lossless/{chat,responses,messages}.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ccproxy.lossless.markers import RETRIEVE_TOOL
from ccproxy.protocol import ProxyError
from ccproxy.retrieval import OriginalsStore
from ccproxy.upstream import UpstreamReply

logger = logging.getLogger("ccproxy")

Send = Callable[[dict[str, Any], bool], Awaitable[UpstreamReply]]  # (body, stream) -> the upstream's reply
# The tool's answer when the id is not (or no longer) held: a clear error the model can act on.
MISSING = (
    "ccproxy_retrieve error: no text is kept under this id (unknown, or expired: originals are kept for "
    "a few minutes only). Answer with what is in the conversation."
)
BAD_ARGUMENTS = 'ccproxy_retrieve error: call it with {"id": "<the id shown in the marker>"}.'


@dataclass(frozen=True)
class Call:
    id: str  # the call's id in its API
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass
class RetrieveRounds:
    """What the loop did for one request: the ledger and the metrics read it."""

    rounds: int = 0  # upstream calls beyond the first
    calls: int = 0  # ccproxy_retrieve calls answered
    missing: int = 0  # of which named an id not held
    extra_prompt_tokens: int = 0  # the prompt tokens the extra rounds cost (the upstream's count)


class Splicer(Protocol):
    """One streamed answer, over as many rounds as the loop takes."""

    def read(self, event: bytes) -> list[bytes]:
        """What the client gets of one upstream event, now."""
        ...

    def round_calls(self) -> tuple[list[Call], bool]:
        """This round's calls of ccproxy's tool, and whether the client's tools were called too."""
        ...

    def round_answer(self) -> dict[str, Any]:
        """This round's answer assembled as a whole one (``Dialect.continued`` reads it)."""
        ...

    def round_usage(self) -> dict[str, Any] | None: ...

    def next_round(self) -> None:
        """The round's held events are dropped: the next round's stream follows."""
        ...

    def finish(self, usage: dict[str, Any] | None) -> list[bytes]:
        """The held events, ccproxy's calls left out and ``usage`` (every round's) in place."""
        ...


class Dialect(Protocol):
    def with_tool(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def calls(self, answer: dict[str, Any]) -> list[Call]: ...

    def continued(self, body: dict[str, Any], answer: dict[str, Any], results: Sequence[tuple[Call, str]]) -> dict[str, Any]:
        """The next round's request: ``body``, the answer, and the tool's results."""
        ...

    def without_ours(self, answer: dict[str, Any]) -> dict[str, Any]: ...

    def joined(self, earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
        """``later`` with what ``earlier`` (a round before, without ccproxy's calls) showed the
        client first: a streamed answer shows every round's text, and so does a whole one."""
        ...

    def usage(self, answer: dict[str, Any]) -> dict[str, Any] | None: ...

    def with_usage(self, answer: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]: ...

    def prompt_tokens(self, usage: dict[str, Any]) -> int: ...

    def splicer(self) -> Splicer: ...


class UsageAtTop:
    """``Dialect.usage``/``with_usage`` for answers whose usage is their top-level ``usage``
    object (all three APIs)."""

    def usage(self, answer: dict[str, Any]) -> dict[str, Any] | None:
        usage = answer.get("usage")
        return usage if isinstance(usage, dict) else None

    def with_usage(self, answer: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
        return {**answer, "usage": usage}


def summed(usages: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Every round's usage added up, field by field (nested details too); other fields as the
    last round has them."""
    present = [usage for usage in usages if isinstance(usage, dict)]
    if not present:
        return None
    total: dict[str, Any] = {}
    for usage in present:
        for name, value in usage.items():
            if isinstance(value, bool) or value is None:
                total[name] = value
            elif isinstance(value, int) and isinstance(total.get(name, 0), int):
                total[name] = total.get(name, 0) + value
            elif isinstance(value, dict):
                total[name] = summed([total.get(name) if isinstance(total.get(name), dict) else None, value])
            else:
                total[name] = value
    return total


def is_ours(call: Call) -> bool:
    return call.name == RETRIEVE_TOOL


@dataclass
class Retriever:
    """The loop for one request: its dialect, the account's originals, and what it did."""

    dialect: Dialect
    store: OriginalsStore
    account: str
    max_rounds: int
    done: RetrieveRounds

    def result(self, call: Call) -> str:
        self.done.calls += 1
        try:
            arguments = json.loads(call.arguments or "{}")
        except ValueError:
            arguments = None
        ref = arguments.get("id") if isinstance(arguments, dict) else None
        if not isinstance(ref, str):
            self.done.missing += 1
            return BAD_ARGUMENTS
        text = self.store.get(self.account, ref.strip())
        if text is None:
            self.done.missing += 1
            return MISSING
        return text

    async def results(self, calls: Sequence[Call]) -> list[tuple[Call, str]]:
        """Each call with its answer; a store in Redis is read in a thread, off the event loop."""
        if getattr(self.store, "remote", False):
            return await asyncio.to_thread(lambda: [(call, self.result(call)) for call in calls])
        return [(call, self.result(call)) for call in calls]

    def _next(self, calls: Sequence[Call]) -> list[Call] | None:
        """ccproxy's calls to answer in another round, or None when the answer ends here."""
        ours = [call for call in calls if is_ours(call)]
        if not ours or len(ours) < len(calls) or self.done.rounds >= self.max_rounds:
            return None
        return ours

    async def answered(self, send: Send, body: dict[str, Any]) -> UpstreamReply:
        """A whole (non-streamed) answer, after as many rounds as the model asks for."""
        reply = await send(body, False)
        usages: list[dict[str, Any] | None] = []
        earlier: list[dict[str, Any]] = []  # the answers of the rounds before
        while reply.status == 200:
            try:
                answer = json.loads(reply.body)
            except ValueError:
                return reply
            if not isinstance(answer, dict):
                return reply
            calls = self.dialect.calls(answer)
            ours = self._next(calls)
            if ours is None:
                if any(is_ours(call) for call in calls):
                    answer = self.dialect.without_ours(answer)
                if usages:
                    total = summed([*usages, self.dialect.usage(answer)])
                    for before in reversed(earlier):
                        answer = self.dialect.joined(self.dialect.without_ours(before), answer)
                    if total is not None:
                        answer = self.dialect.with_usage(answer, total)
                if usages or any(is_ours(call) for call in calls):
                    reply = replace(reply, body=json.dumps(answer).encode())
                return reply
            usages.append(self.dialect.usage(answer))
            earlier.append(answer)
            body = self.dialect.continued(body, answer, await self.results(ours))
            self.done.rounds += 1
            reply = await send(body, False)
            if reply.status == 200:
                self._count_extra(self.dialect.usage(_json_or_empty(reply.body)))
        return reply

    def _count_extra(self, usage: dict[str, Any] | None) -> None:
        if usage is not None:
            self.done.extra_prompt_tokens += self.dialect.prompt_tokens(usage)

    def spliced(self, send: Send, body: dict[str, Any], first: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return self._spliced(send, body, first)

    async def _spliced(self, send: Send, body: dict[str, Any], events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        splicer = self.dialect.splicer()
        usages: list[dict[str, Any] | None] = []
        while True:
            async for event in events:
                for out in splicer.read(event):
                    yield out
            usage = splicer.round_usage()
            if usages:
                self._count_extra(usage)
            usages.append(usage)
            calls, theirs = splicer.round_calls()
            ours = None if theirs else self._next(calls)
            if ours is None:
                for out in splicer.finish(summed(usages)):
                    yield out
                return
            body = self.dialect.continued(body, splicer.round_answer(), await self.results(ours))
            self.done.rounds += 1
            splicer.next_round()
            reply = await send(body, True)
            if reply.events is None:
                # The status line went out with the first round: tell it inside the stream.
                failure = ProxyError(
                    502, "The upstream refused the request that continues the answer after ccproxy_retrieve.",
                    type="upstream_error",
                )
                failure.upstream_accepted = True  # the first round was answered, and billed
                raise failure
            events = reply.events


def _json_or_empty(body: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(body)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}
