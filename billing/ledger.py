"""The billing ledger (migrations/*/0002_billing.sql): which account-hours were reported to
Stripe, when, and with which Stripe ids.

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

from billing.job import Batch, BillingAccount, Line, Unbilled
from ccproxy.usage.store import SqlStore

_BATCH_COLUMNS = (
    "batch_id, mode, account_id, stripe_customer_id, period_start, period_end, quantity, "
    "amount_minor, currency, meter_event_name, stripe_object_id, stripe_invoice_id"
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
        """Per account-hour in [start, end): the tokens_after that the ledger does not cover
        yet (all of them, or what was recorded after the hour was last billed)."""
        ts = self._store._ts
        rows = self._read(
            "SELECT h.account_id, h.hour, h.tokens_after, COALESCE(l.billed, 0), "
            "COALESCE(l.next_seq, 0) "
            "FROM ccproxy_usage_hourly h LEFT JOIN ("
            "  SELECT account_id, hour, SUM(tokens_after) AS billed, MAX(seq) + 1 AS next_seq "
            "  FROM ccproxy_billing_ledger WHERE hour >= ? AND hour < ? "
            "  GROUP BY account_id, hour"
            ") l ON l.account_id = h.account_id AND l.hour = h.hour "
            "WHERE h.hour >= ? AND h.hour < ? AND h.tokens_after > COALESCE(l.billed, 0) "
            "ORDER BY h.account_id, h.hour",
            (ts(start), ts(end), ts(start), ts(end)),
        )
        return [
            Unbilled(r[0], self._store._dt(r[1]), int(r[4]), int(r[2]) - int(r[3])) for r in rows
        ]

    # --- batches -----------------------------------------------------------------------------
    def reserve(self, batch: Batch) -> bool:
        """Store the batch as pending with its ledger rows, in one transaction. False when one
        of its account-hour rows is taken (another run reserved it first): send nothing."""
        ts = self._store._ts
        q = self._store._q
        insert_batch = q(
            f"INSERT INTO ccproxy_billing_batches ({_BATCH_COLUMNS}, state, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)"
        )
        insert_line = q(
            "INSERT INTO ccproxy_billing_ledger (account_id, hour, seq, tokens_after, batch_id) "
            "VALUES (?, ?, ?, ?, ?)"
        )
        # A rejected batch with this id left its hours free; its row goes, the new one replaces it.
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
            self._now(),
        )

        def transaction(conn: Any) -> None:
            conn.execute(drop_rejected, (b.batch_id,))
            conn.execute(insert_batch, batch_row)
            for line in b.lines:
                row = (b.account_id, ts(line.hour), line.seq, line.tokens_after, b.batch_id)
                conn.execute(insert_line, row)

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
        """Batches a crashed or failed run left behind, oldest first, as they were stored."""
        return [r.batch for r in self.batches(state="pending")]

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
        lines = self._lines([r[0] for r in rows])
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
                    stripe_object_id=r[10],
                    stripe_invoice_id=r[11],
                ),
                state=r[12],
                last_error=r[13],
                created_at=dt(r[14]),
                sent_at=None if r[15] is None else dt(r[15]),
            )
            for r in rows
        ]

    def _lines(self, batch_ids: Sequence[str]) -> dict[str, tuple[Line, ...]]:
        if not batch_ids:
            return {}
        found: dict[str, list[Line]] = {}
        # Chunked: both drivers cap the parameters of one statement.
        for i in range(0, len(batch_ids), 500):
            chunk = list(batch_ids[i : i + 500])
            marks = ", ".join(["?"] * len(chunk))
            rows = self._read(
                "SELECT batch_id, hour, seq, tokens_after FROM ccproxy_billing_ledger "
                f"WHERE batch_id IN ({marks}) ORDER BY hour, seq",
                chunk,
            )
            for r in rows:
                found.setdefault(r[0], []).append(Line(self._store._dt(r[1]), int(r[2]), int(r[3])))
        return {k: tuple(v) for k, v in found.items()}
