"""CPU-heavy steps of a request (segmenting, token counting) off the event loop, bounded.

A worker's event loop serves every request on it, ``/readyz`` included; seconds of
segmentation inside it stall them all, and ``asyncio.wait_for`` cannot interrupt code that
never yields. Large inputs therefore run in a thread, at most ``concurrency`` at a time, and a
slot is given back only when the thread has finished, not when its caller gave up on it, so
abandoned work still counts against the bound. Small inputs run inline: a thread hop costs
more than their work, and they never queue behind a large one.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Offload(Protocol):
    def __call__(self, size_chars: int, fn: Callable[..., T], /, *args: object) -> Awaitable[T]: ...


async def inline(size_chars: int, fn: Callable[..., T], /, *args: object) -> T:
    """Runs ``fn`` in the caller's thread: for tests, scripts and the in-process compressor."""
    return fn(*args)


# How long a thread may keep the GIL while another waits for it. CPython's default, 5 ms, is
# paid by the event loop on every socket call it makes while a heavy thread runs (the "convoy
# effect"): a small request makes dozens of such calls, and waited 300-900 ms behind one large
# request. Measured (20 loopback round trips beside a thread walking 400 k objects): 476 ms
# at 5 ms, 128 ms at 0.5 ms, 77 ms at 0.1 ms. The interval only matters while threads contend;
# the heavy thread then loses a little throughput to switching.
EVENT_LOOP_SWITCH_INTERVAL_S = 0.0001


def serial_tokenizers() -> None:
    """Process-wide, before the first tokenizer runs: Hugging Face tokenizers would otherwise
    spread one batch over every core (rayon), and a large request's count then starved the
    event loop and every other process of CPU. A gateway serves many requests at once; each
    count runs on one core."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def favour_the_event_loop() -> None:
    """Process-wide, for a Gateway worker once it has loaded everything: shorten the GIL switch
    interval (above), and move every object that exists now out of the cyclic garbage
    collector's reach (``gc.freeze``). A full collection scanned the ~360 k objects of the
    loaded modules and tokenizers, ~190 ms with the GIL held, at moments a large request's
    allocations chose; frozen, they are never scanned again."""
    sys.setswitchinterval(EVENT_LOOP_SWITCH_INTERVAL_S)
    gc.collect()
    gc.freeze()


# How much lower than the worker's other threads heavy work runs (Linux nice is per thread).
# On a busy machine the scheduler then gives the event loop's thread a core first: the loop's
# work is short, the heavy work only finishes a little later.
HEAVY_WORK_NICENESS = 10


def _run_at_lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + HEAVY_WORK_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at the same priority
        pass


class HeavyWork:
    """An ``Offload``: inputs of at least ``min_chars`` run in threads of their own, lower in
    priority than the event loop's, ``concurrency`` at once."""

    def __init__(self, concurrency: int, min_chars: int) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self._slots = asyncio.Semaphore(concurrency)
        self._min_chars = min_chars
        # Threads of their own: the default executor also runs the short blocking calls of
        # every request (key lookups, usage appends), which must not run at lower priority.
        self._threads = ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="heavy-work", initializer=_run_at_lower_priority
        )
        self.running = 0  # threads at work now; for tests and metrics

    async def __call__(self, size_chars: int, fn: Callable[..., T], /, *args: object) -> T:
        if size_chars < self._min_chars:
            return fn(*args)
        await self._slots.acquire()
        self.running += 1

        def finished(_: object) -> None:
            self.running -= 1
            self._slots.release()

        try:
            future = asyncio.get_running_loop().run_in_executor(self._threads, functools.partial(fn, *args))
        except BaseException:
            finished(None)
            raise
        future.add_done_callback(finished)
        # shield: a cancelled caller must not cancel the future, whose callback frees the slot
        # only once the thread is really done.
        return await asyncio.shield(future)


# Bodies at least this large are freed piece by piece in a heavy-work thread (``release``).
RELEASE_MIN_BYTES = 1 << 20


# Elements of a long list freed per step: ~0.3 ms of deallocation each for small dicts.
RELEASE_SLICE = 1000


def release(*values: Any) -> None:
    """Empties parsed request bodies in steps, in the calling thread (a heavy-work one). Freeing
    a body of 400 k content parts in one go is one C deallocation that never gives the GIL up:
    ~150 ms on the event loop, where a coroutine's locals die when it returns. Here a long list
    loses RELEASE_SLICE elements per step, and Python switches threads between steps; dicts and
    short lists are opened to reach the long lists inside them. The containers are emptied in
    place: call it only once nothing will read them again."""
    pending: list[Any] = list(values)
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(value for value in item.values() if isinstance(value, (dict, list)))
            item.clear()
        elif isinstance(item, list):
            if len(item) <= RELEASE_SLICE:
                pending.extend(value for value in item if isinstance(value, (dict, list)))
                item.clear()
                continue
            while item:
                del item[-RELEASE_SLICE:]
