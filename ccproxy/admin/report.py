"""The admin page's numbers (GET /admin/api/summary), from grouped usage rows: pure functions.

Money saved is what the saved tokens would have cost at the input price of the model they were
saved for, from the same price table as billing and the spend cap (ccproxy/pricing.py), so the
page and the invoice agree on what a token costs. Exact Decimals are summed; each figure is
rounded once, to millionths of the currency's main unit, when it becomes JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from ccproxy.pricing import TOKENS_PER_PRICE, PriceTable
from ccproxy.usage.events import TOTAL_FIELDS, as_utc
from ccproxy.usage.report import Granularity, bucket_grid, iso_utc, savings_percent

TOP_ACCOUNTS = 50
TOP_KEYS = 50
TOP_MODELS = 10


@dataclass(frozen=True)
class GroupRow:
    """Usage of one account, key, model and kind over the whole range (TOTAL_FIELDS sums)."""

    account_id: str
    account_name: str
    key_id: str  # '' for usage recorded before keys were kept per row, or without a key
    key_label: str
    model: str
    kind: str
    counts: tuple[int, ...]


@dataclass(frozen=True)
class SeriesRow:
    """Usage of one hour and model (TOTAL_FIELDS sums)."""

    hour: datetime
    model: str
    counts: tuple[int, ...]


@dataclass
class _Sum:
    counts: list[int]
    money_saved: Decimal

    @classmethod
    def zero(cls) -> _Sum:
        return cls([0] * len(TOTAL_FIELDS), Decimal(0))

    def add(self, counts: Sequence[int], money_saved: Decimal) -> None:
        for i, value in enumerate(counts):
            self.counts[i] += value
        self.money_saved += money_saved

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(zip(TOTAL_FIELDS, self.counts, strict=True))
        out["savings_percent"] = savings_percent(out["tokens_before"], out["tokens_saved"])
        out["money_saved"] = float(round(self.money_saved, 6))
        return out


_SAVED = TOTAL_FIELDS.index("tokens_saved")
_BEFORE = TOTAL_FIELDS.index("tokens_before")


def money_saved(prices: PriceTable, model: str, counts: Sequence[int]) -> Decimal:
    """What the saved tokens of a row would have cost as input tokens of its model."""
    _, row = prices.row(model)
    return Decimal(counts[_SAVED]) * row.of("input") / TOKENS_PER_PRICE


def _ranked(sums: Mapping[Any, _Sum], limit: int) -> list[tuple[Any, _Sum]]:
    """The `limit` largest by tokens before compression (ties by name, so the order is stable)."""
    return sorted(sums.items(), key=lambda item: (-item[1].counts[_BEFORE], str(item[0])))[:limit]


def build_admin_report(
    groups: Iterable[GroupRow],
    series: Iterable[SeriesRow],
    outcomes: Mapping[str, int],
    start: datetime,
    end: datetime,
    granularity: Granularity,
    prices: PriceTable,
    currency: str,
    *,
    truncated: bool = False,
) -> dict[str, Any]:
    """Totals, a series over [start, end) with every bucket, the largest accounts, keys and
    models, and the compression outcome mix. `truncated`: a query hit its row cap
    (ccproxy/admin/queries.py), so the lists may miss small entries and the series late hours."""
    start, end = as_utc(start), as_utc(end)
    if start >= end:
        raise ValueError(f"start ({iso_utc(start)}) must be before end ({iso_utc(end)})")
    grid = bucket_grid(start, end, granularity)
    buckets = [_Sum.zero() for _ in range(grid.count)]
    for row in series:
        hour = as_utc(row.hour)
        if start <= hour < end:
            buckets[grid.index(hour)].add(row.counts, money_saved(prices, row.model, row.counts))

    total = _Sum.zero()
    accounts: dict[str, _Sum] = {}
    account_names: dict[str, str] = {}
    keys: dict[tuple[str, str], _Sum] = {}
    key_labels: dict[tuple[str, str], str] = {}
    models: dict[str, _Sum] = {}
    for group in groups:
        money = money_saved(prices, group.model, group.counts)
        total.add(group.counts, money)
        accounts.setdefault(group.account_id, _Sum.zero()).add(group.counts, money)
        account_names[group.account_id] = group.account_name
        key = (group.account_id, group.key_id)
        keys.setdefault(key, _Sum.zero()).add(group.counts, money)
        key_labels[key] = group.key_label
        models.setdefault(group.model, _Sum.zero()).add(group.counts, money)

    mix = sorted(outcomes.items(), key=lambda item: (-item[1], item[0]))
    return {
        "object": "ccproxy.admin.summary",
        "from": iso_utc(start),
        "to": iso_utc(end),
        "granularity": granularity,
        "currency": currency,
        "truncated": truncated,
        "totals": total.fields(),
        "series": [{"start": grid.start(i), **bucket.fields()} for i, bucket in enumerate(buckets)],
        "accounts": [
            {"account_id": account, "name": account_names[account], **sums.fields()}
            for account, sums in _ranked(accounts, TOP_ACCOUNTS)
        ],
        "keys": [
            {
                "key_id": key_id or None,
                "account": account_names[account],
                "label": key_labels[(account, key_id)] or None,
                **sums.fields(),
            }
            for (account, key_id), sums in _ranked(keys, TOP_KEYS)
        ],
        "models": [{"model": model or None, **sums.fields()} for model, sums in _ranked(models, TOP_MODELS)],
        "outcomes": [{"outcome": outcome, "requests": n} for outcome, n in mix],
    }
