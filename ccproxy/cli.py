"""``ccproxy`` (or ``python -m ccproxy``): serve, administer keys, read usage, compress.

    ccproxy serve [--port 3000] [-- bentoml serve options]
    ccproxy keys create --account acme [--label ci]
    ccproxy keys list [--account acme]
    ccproxy keys revoke <key id>
    ccproxy usage --account acme [--from 2026-12-01] [--to 2026-12-02] [--granularity day]
    ccproxy compress [--ratio 0.2 | --budget 4000] < messages.json
    ccproxy db migrate

Every command reads the same settings as the Gateway (CCPROXY_* variables): ``keys``, ``usage``
and ``db`` talk to the database that CCPROXY_DATABASE_URL (or the SQLite file in
CCPROXY_DATA_DIR) names; ``compress`` loads the scorer in this process (the ``scorer`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from ccproxy.auth import issue_key
from ccproxy.settings import Settings
from ccproxy.usage.store import UsageStore, open_store

# The BentoML services, importable wherever ccproxy is installed (the root service.py re-exports them).
SERVICE = "ccproxy.service:Gateway"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccproxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    # --json after the command too (`ccproxy keys create --account a --json`).
    json_too = argparse.ArgumentParser(add_help=False)
    json_too.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print machine-readable JSON")
    groups = parser.add_subparsers(dest="group", required=True)

    serve = groups.add_parser("serve", help="serve the Gateway (and what it depends on) with bentoml")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=3000)
    serve.add_argument("bentoml_options", nargs=argparse.REMAINDER, help="passed on to `bentoml serve` after --")

    usage = groups.add_parser("usage", parents=[json_too], help="an account's usage: tokens before, after, saved, and money saved")
    usage.add_argument("--account", required=True, help="account name")
    usage.add_argument("--from", dest="start", default=None, help="ISO date or time (default: 30 days before --to)")
    usage.add_argument("--to", dest="end", default=None, help="ISO date or time; a bare date includes that day (default: now)")
    usage.add_argument("--granularity", choices=["hour", "day"], default="day")

    compress = groups.add_parser("compress", help="compress chat messages (JSON on stdin) as the proxy would")
    compress.add_argument("--ratio", type=float, default=None, help="share of the droppable tokens to keep")
    compress.add_argument("--budget", type=int, default=None, help="tokens for the whole prompt")

    keys = groups.add_parser("keys", help="API keys").add_subparsers(dest="command", required=True)
    create = keys.add_parser("create", parents=[json_too], help="create a key (shown once) for an account, creating the account if new")
    create.add_argument("--account", required=True, help="account name")
    create.add_argument("--label", default=None, help="a note to tell keys apart")
    listing = keys.add_parser("list", parents=[json_too], help="list keys (never the keys themselves)")
    listing.add_argument("--account", default=None, help="only this account's keys")
    revoke = keys.add_parser("revoke", parents=[json_too], help="revoke a key by its id")
    revoke.add_argument("key_id")

    db = groups.add_parser("db", help="database").add_subparsers(dest="command", required=True)
    db.add_parser("migrate", parents=[json_too], help="apply the SQL migrations")
    return parser


def _create(store: UsageStore, account: str, label: str | None) -> dict[str, str | None]:
    account_id = store.ensure_account(account)
    issued = issue_key()
    store.insert_key(issued.key_id, account_id, issued.key_hash, label)
    return {"key": issued.key, "key_id": issued.key_id, "account": account, "label": label}


def _serve(host: str, port: int, options: Sequence[str]) -> int:
    """Replaces this process with ``bentoml serve``: signals and the exit code are bentoml's."""
    options = list(options[1:] if options[:1] == ["--"] else options)
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port), *options]
    os.execv(sys.executable, command)
    return 1  # not reached


def _usage(store: UsageStore, settings: Settings, account: str, start: str | None, end: str | None,
           granularity: str) -> dict[str, Any] | None:
    from ccproxy.usage.report import build_report, usage_window

    found = store.account_by_name(account)
    if found is None:
        return None
    window = usage_window(start, end, granularity, datetime.now(timezone.utc))
    hours = store.hourly(found.id, *window)
    return {**build_report(hours, *window, granularity, settings.price_per_million_input_tokens_usd), "account": account}


def _compress(settings: Settings, ratio: float | None, budget: int | None) -> dict[str, Any]:
    from ccproxy.compression.local import compress

    try:
        body = json.load(sys.stdin)
    except ValueError as exc:
        raise ValueError(f"stdin is not JSON ({exc.msg}): send {{\"messages\": [...]}} or a list of messages") from None
    messages = body.get("messages") if isinstance(body, dict) else body
    if not isinstance(messages, list):
        raise ValueError('stdin holds no messages: send {"messages": [...]} or a list of messages')
    result = compress(messages, ratio=ratio, budget=budget, settings=settings)
    return {
        "messages": result.forwarded,
        "outcome": result.outcome,
        "tokens_before": result.tokens_before,
        "tokens_after": result.tokens_after,
        "tokens_saved": result.tokens_saved,
    }


def run(argv: Sequence[str], settings: Settings) -> int:
    args = _parser().parse_args(argv)
    if args.group == "serve":
        return _serve(args.host, args.port, args.bentoml_options)
    if args.group == "compress":
        try:
            print(json.dumps(_compress(settings, args.ratio, args.budget), ensure_ascii=False))
        except ValueError as exc:  # the input, a ratio or budget out of range
            print(f"ccproxy compress: {exc}", file=sys.stderr)
            return 2
        except RuntimeError as exc:  # the scorer extra is missing
            print(f"ccproxy compress: {exc}", file=sys.stderr)
            return 1
        return 0
    store = open_store(settings)
    try:
        store.migrate()
        if args.group == "db":
            print(json.dumps({"migrated": True}) if args.json else "database is up to date")
            return 0
        if args.group == "usage":
            try:
                report = _usage(store, settings, args.account, args.start, args.end, args.granularity)
            except ValueError as exc:
                print(f"ccproxy usage: {exc}", file=sys.stderr)
                return 2
            if report is None:
                print(f"ccproxy usage: no account named {args.account!r}", file=sys.stderr)
                return 1
            print(json.dumps(report, indent=None if args.json else 2))
            return 0
        if args.command == "create":
            created = _create(store, args.account, args.label)
            if args.json:
                print(json.dumps(created))
            else:
                print(f"API key for account {args.account!r} (key id {created['key_id']}):\n\n  {created['key']}\n")
                print("It is shown only this once; ccproxy stores only its hash.")
            return 0
        if args.command == "list":
            rows = [
                {
                    "key_id": row.key_id,
                    "account": row.account_name,
                    "label": row.label,
                    "created_at": row.created_at.isoformat(),
                    "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
                }
                for row in store.list_keys(args.account)
            ]
            if args.json:
                print(json.dumps(rows))
            else:
                for row in rows:
                    state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
                    print(f"{row['key_id']}  {row['account']}  {row['label'] or '-'}  {row['created_at']}  {state}")
            return 0
        revoked = store.revoke_key(args.key_id)
        if args.json:
            print(json.dumps({"key_id": args.key_id, "revoked": revoked}))
        else:
            print(f"revoked {args.key_id}" if revoked else f"no active key with id {args.key_id}")
        return 0 if revoked else 1
    finally:
        store.close()


def main() -> None:
    sys.exit(run(sys.argv[1:], Settings()))
