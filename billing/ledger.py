"""The billing ledger (migrations/*/0002_billing.sql, 0004_billing_kinds.sql): which usage
(per account-hour, model and kind) was reported to Stripe, at which prices, when, and with
which Stripe ids.

The billing SQL lives here, not in ccproxy/usage/store.py: it runs on the store's connection,
transactions and dialect hooks (placeholder, timestamp conversion), so one text serves SQLite
and Postgres, as the store's own queries do.

Protocol per batch: `reserve` (batch 'pending' + its ledger rows, one transaction) -> Stripe
calls, each followed by `record` -> `mark_sent`. A crash anywhere leaves a pending batch that
the next run re-sends as it was stored. Because ledger rows are written before the Stripe call,
an hour is never picked up twice, by a rerun or by two overlapping runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from decimal import Decimal

from billing.job import Batch, BillingAccount, Line, PricedLine, Unbilled, Usage
from ccproxy.usage.store import SqlStore

_BATCH_COLUMNS = (
    "batch_id, mode, account_id, stripe_customer_id, period_start, period_end, quantity, "
    "amount_minor, currency, meter_event_name, stripe_object_id, stripe_invoice_id, "
    "review_reason"
)
_USAGE = ("tokens_before", "tokens_after", "cached_tokens", "completion_tokens")
_LEDGER_COLUMNS = ("account_id", "hour", "seq", "model", "kind", *_USAGE, "batch_id")
_PRICED_COLUMNS = (
    "batch_id, line_no, model, kind, token_class, priced_as, tokens, price_per_million, "
    "amount_minor, stripe_object_id"
)


@dataclass(frozen=True)
class BatchRecord:
    """A batch as the ledger holds it, with its state and times (for reports and tests)."""

    batch: Batch
    state: str
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None


class BillingLedger:
    def __init__(self, store: SqlStore) -> None:
        self._store = store

    # --- helpers -----------------------------------------------------------------------------
    def _now(self) -> Any:
        return self._store._ts(datetime.now(timezone.utc))

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        q = self._store._q(sql)
        rows: list[tuple[Any, ...]] = self._store._read(
            lambda conn: conn.execute(q, tuple(params)).fetchall()
        )
        return rows

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        q = self._store._q(sql)
        return int(self._store._write(lambda conn: conn.execute(q, tuple(params)).rowcount))

    # --- accounts ----------------------------------------------------------------------------
    def accounts(self) -> dict[str, BillingAccount]:
        rows = self._read("SELECT id, name, stripe_customer_id FROM ccproxy_accounts")
        return {r[0]: BillingAccount(r[0], r[1], r[2]) for r in rows}

    def account(self, name: str) -> BillingAccount | None:
        rows = self._read(
            "SELECT id, name, stripe_customer_id FROM ccproxy_accounts WHERE name = ?", (name,)
        )
        return BillingAccount(*rows[0]) if rows else None

    def set_customer(self, name: str, customer_id: str | None) -> bool:
        """Attach a Stripe customer id to the account called `name`; False if there is none."""
        sql = "UPDATE ccproxy_accounts SET stripe_customer_id = ? WHERE name = ?"
        return self._execute(sql, (customer_id, name)) > 0

    # --- what is left to bill ------------------------------------------------------------------
    def unbilled(self, start: datetime, end: datetime) -> list[Unbilled]:
        """Per account-hour, model and kind in [start, end): the usage that the ledger does not
        cover yet (all of it, or what was recorded after the hour was last billed), with the
        report number (seq) the account-hour's next batch takes."""
        ts = self._store._ts
        sums = ", ".join(f"SUM({c}) AS {c}" for c in _USAGE)
        rows = self._read(
            "SELECT h.account_id, h.hour, h.model, h.kind, "
            + ", ".join(f"h.{c}" for c in _USAGE)
            + ", "
            + ", ".join(f"COALESCE(l.{c}, 0)" for c in _USAGE)
            + ", COALESCE(n.next_seq, 0) FROM ("
            f"  SELECT account_id, hour, model, kind, {sums} FROM ccproxy_usage_hourly "
            "  WHERE hour >= ? AND hour < ? GROUP BY account_id, hour, model, kind"
            ") h LEFT JOIN ("
            f"  SELECT account_id, hour, model, kind, {sums} FROM ccproxy_billing_ledger "
            "  WHERE hour >= ? AND hour < ? GROUP BY account_id, hour, model, kind"
            ") l ON l.account_id = h.account_id AND l.hour = h.hour AND l.model = h.model "
            "  AND l.kind = h.kind "
            "LEFT JOIN ("
            "  SELECT account_id, hour, MAX(seq) + 1 AS next_seq FROM ccproxy_billing_ledger "
            "  WHERE hour >= ? AND hour < ? GROUP BY account_id, hour"
            ") n ON n.account_id = h.account_id AND n.hour = h.hour "
            "ORDER BY h.account_id, h.hour, h.model, h.kind",
            (ts(start), ts(end)) * 3,
        )
        found = []
        for r in rows:
            total = Usage(*(int(v) for v in r[4:8]))
            billed = Usage(*(int(v) for v in r[8:12]))
            left = total.minus(billed)
            if left.billable(r[3]):
                found.append(Unbilled(r[0], self._store._dt(r[1]), int(r[12]), r[2], r[3], left))
        return found

    # --- batches -----------------------------------------------------------------------------
    def reserve(self, batch: Batch) -> bool:
        """Store the batch as pending with its ledger rows and priced lines, in one transaction.
        False when one of its ledger rows is taken (another run reserved it first): send
        nothing."""
        ts = self._store._ts
        q = self._store._q
        insert_batch = q(
            f"INSERT INTO ccproxy_billing_batches ({_BATCH_COLUMNS}, state, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)"
        )
        marks = ", ".join(["?"] * len(_LEDGER_COLUMNS))
        insert_line = q(
            f"INSERT INTO ccproxy_billing_ledger ({', '.join(_LEDGER_COLUMNS)}) VALUES ({marks})"
        )
        insert_priced = q(
            f"INSERT INTO ccproxy_billing_lines ({_PRICED_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        # A rejected batch with this id left its hours free; its row goes, the new one replaces it.
        drop_rejected_lines = q(
            "DELETE FROM ccproxy_billing_lines WHERE batch_id IN (SELECT batch_id FROM "
            "ccproxy_billing_batches WHERE batch_id = ? AND state = 'rejected')"
        )
        drop_rejected = q(
            "DELETE FROM ccproxy_billing_batches WHERE batch_id = ? AND state = 'rejected'"
        )
        b = batch
        batch_row = (
            b.batch_id,
            b.mode,
            b.account_id,
            b.stripe_customer_id,
            ts(b.period_start),
            ts(b.period_end),
            b.quantity,
            b.amount_minor,
            b.currency,
            b.meter_event_name,
            b.stripe_object_id,
            b.stripe_invoice_id,
            b.review_reason,
            self._now(),
        )

        def transaction(conn: Any) -> None:
            conn.execute(drop_rejected_lines, (b.batch_id,))
            conn.execute(drop_rejected, (b.batch_id,))
            conn.execute(insert_batch, batch_row)
            for line in b.lines:
                u = line.usage
                row = (
                    b.account_id,
                    ts(line.hour),
                    line.seq,
                    line.model,
                    line.kind,
                    u.tokens_before,
                    u.tokens_after,
                    u.cached_tokens,
                    u.completion_tokens,
                    b.batch_id,
                )
                conn.execute(insert_line, row)
            for x in b.priced:
                priced = (
                    b.batch_id,
                    x.line_no,
                    x.model,
                    x.kind,
                    x.token_class,
                    x.priced_as,
                    x.tokens,
                    str(x.price_per_million),
                    x.amount_minor,
                    x.stripe_object_id,
                )
                conn.execute(insert_priced, priced)

        try:
            self._store._write(transaction)
        except self._store._integrity_errors():
            return False
        return True

    def record(
        self,
        batch_id: str,
        *,
        stripe_object_id: str | None = None,
        stripe_invoice_id: str | None = None,
    ) -> None:
        """Remember a Stripe object as soon as it exists, so a resumed run does not create it
        again once Stripe's idempotency keys have expired."""
        self._execute(
            "UPDATE ccproxy_billing_batches SET "
            "stripe_object_id = COALESCE(?, stripe_object_id), "
            "stripe_invoice_id = COALESCE(?, stripe_invoice_id) WHERE batch_id = ?",
            (stripe_object_id, stripe_invoice_id, batch_id),
        )

    def mark_sent(self, batch_id: str, stripe_object_id: str | None = None) -> None:
        self._execute(
            "UPDATE ccproxy_billing_batches SET state = 'sent', sent_at = ?, last_error = NULL, "
            "stripe_object_id = COALESCE(?, stripe_object_id) "
            "WHERE batch_id = ? AND state = 'pending'",
            (self._now(), stripe_object_id, batch_id),
        )

    def record_line(self, batch_id: str, line_no: int, stripe_object_id: str) -> None:
        """Remember the invoice item of one priced line as soon as Stripe made it."""
        self._execute(
            "UPDATE ccproxy_billing_lines SET stripe_object_id = ? "
            "WHERE batch_id = ? AND line_no = ?",
            (stripe_object_id, batch_id, line_no),
        )

    def hold_for_review(self, batch_id: str, reason: str) -> None:
        """Keep a pending batch out of automatic resends until a person resolves it."""
        self._execute(
            "UPDATE ccproxy_billing_batches SET review_reason = ? "
            "WHERE batch_id = ? AND state = 'pending'",
            (reason[:2000], batch_id),
        )

    def release_for_resend(self, batch_id: str) -> bool:
        """A person checked Stripe and found the batch missing: resend it on the next run,
        counting its identifier window from now. False if no held batch has this id."""
        return (
            self._execute(
                "UPDATE ccproxy_billing_batches SET review_reason = NULL, created_at = ? "
                "WHERE batch_id = ? AND state = 'pending' AND review_reason IS NOT NULL",
                (self._now(), batch_id),
            )
            > 0
        )

    def note_error(self, batch_id: str, error: str) -> None:
        """The batch stays pending (Stripe may hold part of it); the next run re-sends it."""
        self._execute(
            "UPDATE ccproxy_billing_batches SET last_error = ? WHERE batch_id = ?",
            (error[:2000], batch_id),
        )

    def reject(self, batch_id: str, error: str) -> None:
        """Stripe refused the batch before creating anything: free its hours for a later run
        (after the cause is fixed) and keep the batch as a record of the refusal."""
        q = self._store._q
        delete = q("DELETE FROM ccproxy_billing_ledger WHERE batch_id = ?")
        update = q(
            "UPDATE ccproxy_billing_batches SET state = 'rejected', last_error = ? "
            "WHERE batch_id = ?"
        )

        def transaction(conn: Any) -> None:
            conn.execute(delete, (batch_id,))
            conn.execute(update, (error[:2000], batch_id))

        self._store._write(transaction)

    def pending(self) -> list[Batch]:
        """Batches a crashed or failed run left behind, oldest first, as they were stored
        (those held for review excluded)."""
        return [r.batch for r in self.batches(state="pending") if r.batch.review_reason is None]

    def batches(self, state: str | None = None, account_id: str | None = None) -> list[BatchRecord]:
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if account_id is not None:
            where.append("account_id = ?")
            params.append(account_id)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self._read(
            f"SELECT {_BATCH_COLUMNS}, state, last_error, created_at, sent_at "
            f"FROM ccproxy_billing_batches {clause}ORDER BY created_at, batch_id",
            params,
        )
        ids = [r[0] for r in rows]
        lines = self._lines(ids)
        priced = self._priced(ids)
        dt = self._store._dt
        return [
            BatchRecord(
                Batch(
                    batch_id=r[0],
                    mode=r[1],
                    account_id=r[2],
                    stripe_customer_id=r[3],
                    period_start=dt(r[4]),
                    period_end=dt(r[5]),
                    quantity=int(r[6]),
                    amount_minor=None if r[7] is None else int(r[7]),
                    currency=r[8],
                    meter_event_name=r[9],
                    lines=lines.get(r[0], ()),
                    priced=priced.get(r[0], ()),
                    stripe_object_id=r[10],
                    stripe_invoice_id=r[11],
                    review_reason=r[12],
                ),
                state=r[13],
                last_error=r[14],
                created_at=dt(r[15]),
                sent_at=None if r[16] is None else dt(r[16]),
            )
            for r in rows
        ]

    def _by_batch(
        self, batch_ids: Sequence[str], columns: str, table: str, order: str
    ) -> dict[str, list[tuple[Any, ...]]]:
        found: dict[str, list[tuple[Any, ...]]] = {}
        # Chunked: both drivers cap the parameters of one statement.
        for i in range(0, len(batch_ids), 500):
            chunk = list(batch_ids[i : i + 500])
            marks = ", ".join(["?"] * len(chunk))
            rows = self._read(
                f"SELECT batch_id, {columns} FROM {table} "
                f"WHERE batch_id IN ({marks}) ORDER BY {order}",
                chunk,
            )
            for r in rows:
                found.setdefault(r[0], []).append(tuple(r[1:]))
        return found

    def _lines(self, batch_ids: Sequence[str]) -> dict[str, tuple[Line, ...]]:
        columns = "hour, seq, model, kind, " + ", ".join(_USAGE)
        rows = self._by_batch(batch_ids, columns, "ccproxy_billing_ledger", "hour, seq, kind, model")
        dt = self._store._dt
        return {
            k: tuple(
                Line(dt(r[0]), int(r[1]), r[2], r[3], Usage(*(int(v) for v in r[4:8]))) for r in v
            )
            for k, v in rows.items()
        }

    def _priced(self, batch_ids: Sequence[str]) -> dict[str, tuple[PricedLine, ...]]:
        columns = _PRICED_COLUMNS.removeprefix("batch_id, ")
        rows = self._by_batch(batch_ids, columns, "ccproxy_billing_lines", "line_no")
        return {
            k: tuple(
                PricedLine(
                    line_no=int(r[0]),
                    model=r[1],
                    kind=r[2],
                    token_class=r[3],
                    priced_as=r[4],
                    tokens=int(r[5]),
                    price_per_million=Decimal(r[6]),
                    amount_minor=None if r[7] is None else int(r[7]),
                    stripe_object_id=r[8],
                )
                for r in v
            )
            for k, v in rows.items()
        }
