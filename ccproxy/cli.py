"""``python -m ccproxy``: administer accounts and API keys, migrate the database.

    python -m ccproxy keys create --account acme [--label ci]
    python -m ccproxy keys list [--account acme]
    python -m ccproxy keys revoke <key id>
    python -m ccproxy db migrate

It talks to the database that CCPROXY_DATABASE_URL (or the SQLite file in CCPROXY_DATA_DIR)
names, the same one the Gateway uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ccproxy.auth import issue_key
from ccproxy.settings import Settings
from ccproxy.usage.store import UsageStore, open_store


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ccproxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    groups = parser.add_subparsers(dest="group", required=True)

    keys = groups.add_parser("keys", help="API keys").add_subparsers(dest="command", required=True)
    create = keys.add_parser("create", help="create a key (shown once) for an account, creating the account if new")
    create.add_argument("--account", required=True, help="account name")
    create.add_argument("--label", default=None, help="a note to tell keys apart")
    listing = keys.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--account", default=None, help="only this account's keys")
    revoke = keys.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")

    db = groups.add_parser("db", help="database").add_subparsers(dest="command", required=True)
    db.add_parser("migrate", help="apply the SQL migrations")
    return parser


def _create(store: UsageStore, account: str, label: str | None) -> dict[str, str | None]:
    account_id = store.ensure_account(account)
    issued = issue_key()
    store.insert_key(issued.key_id, account_id, issued.key_hash, label)
    return {"key": issued.key, "key_id": issued.key_id, "account": account, "label": label}


def run(argv: Sequence[str], settings: Settings) -> int:
    args = _parser().parse_args(argv)
    store = open_store(settings)
    try:
        store.migrate()
        if args.group == "db":
            print(json.dumps({"migrated": True}) if args.json else "database is up to date")
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
