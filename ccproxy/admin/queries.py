"""What the admin page reads from the usage database: every account's rows over a range.

Blocking (the drivers are synchronous): callers run `read_admin_data` in a thread. Each query is
grouped in SQL and capped, so the work and the answer stay bounded whatever the number of
accounts, keys or model names; a capped query says so (`AdminData.truncated`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ccproxy.admin.report import GroupRow, SeriesRow
from ccproxy.usage.events import TOTAL_FIELDS
from ccproxy.usage.store import SqlStore

# Rows per query: groups are (account, key, model, kind), series rows (hour, model); the page
# shows the top 50 of each list, and the series of 5,000 hours and a few models fits.
MAX_ROWS = 20_000
MAX_OUTCOMES = 50

_SUMS = ", ".join(f"SUM(h.{c})" for c in TOTAL_FIELDS)


@dataclass(frozen=True)
class AdminData:
    groups: list[GroupRow]
    series: list[SeriesRow]
    outcomes: dict[str, int]
    truncated: bool


def _counts(values: Any) -> tuple[int, ...]:
    return tuple(int(v or 0) for v in values)


def read_admin_data(store: SqlStore, start: datetime, end: datetime, max_rows: int = MAX_ROWS) -> AdminData:
    """Usage of hours [start, end) grouped per account, key, model and kind, per hour and model,
    and the events' compression outcomes with created_at in [start, end)."""
    window = (store._ts(start), store._ts(end))
    groups_sql = store._q(
        f"SELECT h.account_id, COALESCE(a.name, ''), h.key_id, COALESCE(k.label, ''), h.model, h.kind, {_SUMS} "
        "FROM ccproxy_usage_hourly h "
        "LEFT JOIN ccproxy_accounts a ON a.id = h.account_id "
        "LEFT JOIN ccproxy_api_keys k ON k.key_id = h.key_id "
        "WHERE h.hour >= ? AND h.hour < ? "
        "GROUP BY h.account_id, a.name, h.key_id, k.label, h.model, h.kind "
        "ORDER BY SUM(h.tokens_before) DESC, h.account_id, h.key_id, h.model, h.kind LIMIT ?"
    )
    series_sql = store._q(
        f"SELECT h.hour, h.model, {_SUMS} FROM ccproxy_usage_hourly h "
        "WHERE h.hour >= ? AND h.hour < ? GROUP BY h.hour, h.model ORDER BY h.hour, h.model LIMIT ?"
    )
    outcomes_sql = store._q(
        "SELECT compression, COUNT(*) FROM ccproxy_usage_events "
        "WHERE created_at >= ? AND created_at < ? GROUP BY compression ORDER BY 2 DESC, 1 LIMIT ?"
    )

    def read(conn: Any) -> AdminData:
        # One more row than shown tells whether the cap cut the list.
        groups = conn.execute(groups_sql, (*window, max_rows + 1)).fetchall()
        series = conn.execute(series_sql, (*window, max_rows + 1)).fetchall()
        outcomes = conn.execute(outcomes_sql, (*window, MAX_OUTCOMES)).fetchall()
        return AdminData(
            groups=[GroupRow(str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), _counts(r[6:])) for r in groups[:max_rows]],
            series=[SeriesRow(store._dt(r[0]), str(r[1]), _counts(r[2:])) for r in series[:max_rows]],
            outcomes={str(r[0]): int(r[1]) for r in outcomes},
            truncated=len(groups) > max_rows or len(series) > max_rows,
        )

    return store._read(read)
