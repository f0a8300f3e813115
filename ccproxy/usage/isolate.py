"""Finding the rows that make a batch write fail, by halving the batch.

A write is one transaction, so one bad row fails the whole batch. Halving it until every
failing part is a single row costs about 2·k·log2(n) writes for k bad rows in n, and each good
row is written in some part that succeeded. Writes must be idempotent (the store's are): a
part can be written again when a transient error interrupts the search and the batch is retried.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def write_isolating(
    write: Callable[[Sequence[T]], object],
    items: Sequence[T],
    reason_of: Callable[[BaseException], str | None],
) -> list[tuple[int, str]]:
    """Write `items`; returns (index, reason) of each item that failed alone with an error
    that `reason_of` calls permanent. Every other item has been written. An error that
    `reason_of` answers None for (transient) propagates, and the search stops there."""
    rejected: list[tuple[int, str]] = []
    # (start, end) slices still to write; a stack keeps the order and the depth bounded.
    todo = [(0, len(items))]
    while todo:
        start, end = todo.pop()
        if start == end:
            continue
        try:
            write(items[start:end])
        except Exception as exc:
            reason = reason_of(exc)
            if reason is None:
                raise
            if end - start == 1:
                rejected.append((start, reason))
            else:
                middle = (start + end) // 2
                todo.extend([(middle, end), (start, middle)])  # left half first
    return sorted(rejected)
