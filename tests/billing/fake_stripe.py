"""A recording fake of the part of Stripe's HTTP API that the billing job uses, served on
loopback by http.server in a thread.

It keeps what Stripe keeps for these calls, so retries and resumed runs can be judged:
- Idempotency-Key: a key seen with the same parameters replays the first answer (header
  Idempotent-Replayed: true); with other parameters it is refused (idempotency_error).
  `expire_idempotency_keys()` plays Stripe forgetting them after 24 hours.
- Meter events: a second event with an identifier already held is refused with Stripe's
  message ("An event already exists with identifier ...").
- Invoices: one-off invoices take the customer's pending items; finalize moves draft -> open.
Faults are queued with `fail(...)`: answered before anything is done (a rate limiter, a load
balancer), or with `after_commit=True` done first and then answered with the error (a lost
reply). Every request is recorded.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

Pairs = list[tuple[str, str]]


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    pairs: Pairs
    status: int

    @property
    def params(self) -> dict[str, Any]:
        return unflatten(self.pairs)

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")


@dataclass
class Fault:
    status: int
    path: str | None = None
    retry_after: str | None = None
    should_retry: str | None = None
    after_commit: bool = False


@dataclass
class _State:
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    meter_events: dict[str, dict[str, Any]] = field(default_factory=dict)
    idempotency: dict[str, tuple[str, int, dict[str, Any]]] = field(default_factory=dict)


def unflatten(pairs: Pairs) -> dict[str, Any]:
    """a[b][0]=x -> {"a": {"b": {"0": "x"}}} (lists stay index-keyed maps: easy to compare)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        parts = key.replace("]", "").split("[")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


class FakeStripe:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.faults: deque[Fault] = deque()
        self._state = _State()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- what tests use -------------------------------------------------------------------
    def fail(self, status: int, times: int = 1, **kwargs: Any) -> None:
        for _ in range(times):
            self.faults.append(Fault(status, **kwargs))

    def expire_idempotency_keys(self) -> None:
        with self._lock:
            self._state.idempotency.clear()

    def calls(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path == path]

    @property
    def meter_events(self) -> dict[str, dict[str, Any]]:
        return dict(self._state.meter_events)

    def objects(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self._state.objects.values() if o["object"] == kind]

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Put an object (a customer, a price...) in place as if created earlier."""
        with self._lock:
            self._state.objects[obj["id"]] = obj
        return obj

    # --- HTTP ------------------------------------------------------------------------------
    def _handle(self, http: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(http.path)
        headers = {k.lower(): v for k, v in http.headers.items()}
        if method == "POST":
            length = int(headers.get("content-length") or 0)
            pairs = parse_qsl(http.rfile.read(length).decode(), keep_blank_values=True)
        else:
            pairs = parse_qsl(url.query, keep_blank_values=True)
        with self._lock:
            status, body, extra = self._respond(method, url.path, headers, pairs)
            self.requests.append(Recorded(method, url.path, headers, pairs, status))
        data = json.dumps(body).encode()
        http.send_response(status)
        http.send_header("Content-Type", "application/json")
        http.send_header("Content-Length", str(len(data)))
        http.send_header("Request-Id", f"req_fake_{next(self._ids)}")
        for name, value in extra.items():
            http.send_header(name, value)
        http.end_headers()
        http.wfile.write(data)

    def _respond(
        self, method: str, path: str, headers: dict[str, str], pairs: Pairs
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if not headers.get("authorization", "").startswith("Bearer sk_"):
            return 401, _error("Invalid API Key provided", "invalid_request_error"), {}
        fault = self._take_fault(path)
        if fault is not None and not fault.after_commit:
            return fault.status, _error("fake fault", "api_error"), _fault_headers(fault)
        key = headers.get("idempotency-key") if method == "POST" else None
        fingerprint = json.dumps([path, sorted(pairs)])
        if key is not None and key in self._state.idempotency:
            seen, status, body = self._state.idempotency[key]
            if seen != fingerprint:
                message = "Keys for idempotent requests can only be used with the same parameters"
                return 400, _error(message, "idempotency_error"), {}
            return status, body, {"Idempotent-Replayed": "true"}
        status, body = self._route(method, path, unflatten(pairs))
        if key is not None and status < 400:
            self._state.idempotency[key] = (fingerprint, status, body)
        if fault is not None:
            return (
                fault.status,
                _error("fake fault after commit", "api_error"),
                _fault_headers(fault),
            )
        return status, body, {}

    def _take_fault(self, path: str) -> Fault | None:
        for fault in list(self.faults):
            if fault.path is None or path.startswith(fault.path):
                self.faults.remove(fault)
                return fault
        return None

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_fake{next(self._ids):06d}"

    # --- the resources -------------------------------------------------------------------------
    def _route(self, method: str, path: str, p: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        objects = self._state.objects
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/v1/billing/meter_events":
            return self._meter_event(p)
        if path == "/v1/billing/meters":
            if method == "GET":
                meters = [o for o in objects.values() if o["object"] == "billing.meter"]
                return 200, _list(m for m in meters if m["status"] == p.get("status", m["status"]))
            meter = {
                "id": self._new_id("mtr"),
                "object": "billing.meter",
                "status": "active",
                "event_name": p["event_name"],
                "display_name": p["display_name"],
                "default_aggregation": p["default_aggregation"],
                "customer_mapping": p.get("customer_mapping"),
                "value_settings": p.get("value_settings"),
            }
            return 200, self.add_locked(meter)
        if path == "/v1/products" and method == "POST":
            product = {
                "id": p.get("id") or self._new_id("prod"),
                "object": "product",
                "name": p["name"],
            }
            if product["id"] in objects:
                return 400, _error("Product already exists.", "invalid_request_error")
            return 200, self.add_locked(product)
        if parts[:2] == ["v1", "products"] and len(parts) == 3 and method == "GET":
            found = objects.get(parts[2])
            return (
                (200, found) if found else (404, _error("No such product", "invalid_request_error"))
            )
        if path == "/v1/prices":
            if method == "GET":
                keys = set((p.get("lookup_keys") or {}).values())
                prices = [
                    o
                    for o in objects.values()
                    if o["object"] == "price" and o["active"] and o.get("lookup_key") in keys
                ]
                return 200, _list(prices)
            if p.get("transfer_lookup_key") == "true":
                for o in objects.values():
                    if o["object"] == "price" and o.get("lookup_key") == p.get("lookup_key"):
                        o["lookup_key"] = None
            price = {
                "id": self._new_id("price"),
                "object": "price",
                "active": True,
                "product": p["product"],
                "currency": p["currency"],
                "unit_amount_decimal": p["unit_amount_decimal"],
                "billing_scheme": p.get("billing_scheme"),
                "lookup_key": p.get("lookup_key"),
                "recurring": p.get("recurring"),
            }
            return 200, self.add_locked(price)
        if path == "/v1/customers" and method == "POST":
            customer = {
                "id": self._new_id("cus"),
                "object": "customer",
                "name": p.get("name"),
                "email": p.get("email"),
                "metadata": p.get("metadata", {}),
            }
            return 200, self.add_locked(customer)
        if path == "/v1/subscriptions":
            if method == "GET":
                subs = [
                    o
                    for o in objects.values()
                    if o["object"] == "subscription"
                    and o["customer"] == p.get("customer")
                    and (p.get("price") is None or o["price"] == p["price"])
                ]
                return 200, _list(subs)
            sub = {
                "id": self._new_id("sub"),
                "object": "subscription",
                "status": "active",
                "customer": p["customer"],
                "price": p["items"]["0"]["price"],
            }
            return 200, self.add_locked(sub)
        if path in ("/v1/invoiceitems", "/v1/invoices") and method == "GET":
            kind = "invoiceitem" if path.endswith("items") else "invoice"
            mine = [
                o
                for o in objects.values()
                if o["object"] == kind and o["customer"] == p.get("customer")
            ]
            return 200, _list(reversed(mine))  # newest first, as Stripe lists
        if path == "/v1/invoiceitems" and method == "POST":
            if p["customer"] not in objects:
                return 400, _error(f"No such customer: '{p['customer']}'", "invalid_request_error")
            item = {
                "id": self._new_id("ii"),
                "object": "invoiceitem",
                "customer": p["customer"],
                "amount": int(p["amount"]),
                "currency": p["currency"],
                "invoice": None,
                "period": {k: int(v) for k, v in p.get("period", {}).items()},
                "description": p.get("description"),
                "metadata": p.get("metadata", {}),
            }
            return 200, self.add_locked(item)
        if path == "/v1/invoices" and method == "POST":
            return self._invoice(p)
        if parts[:2] == ["v1", "invoices"] and len(parts) >= 3:
            invoice = objects.get(parts[2])
            if invoice is None:
                return 404, _error("No such invoice", "invalid_request_error")
            if method == "GET" and len(parts) == 3:
                return 200, invoice
            if method == "POST" and parts[3:] == ["finalize"]:
                if invoice["status"] != "draft":
                    return 400, _error("This invoice is already finalized", "invalid_request_error")
                invoice["status"] = "open"
                return 200, invoice
        return 404, _error(f"Unrecognized request URL ({method}: {path})", "invalid_request_error")

    def add_locked(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._state.objects[obj["id"]] = obj
        return obj

    def _meter_event(self, p: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        identifier = p.get("identifier")
        payload = p.get("payload") or {}
        if not identifier or not payload.get("stripe_customer_id") or "value" not in payload:
            return 400, _error("Missing required param", "invalid_request_error")
        if not payload["value"].isdigit():
            return 400, _error("value must be a whole number", "invalid_request_error")
        if identifier in self._state.meter_events:
            message = f"An event already exists with identifier {identifier}."
            return 400, _error(message, "invalid_request_error")
        event = {
            "object": "billing.meter_event",
            "event_name": p["event_name"],
            "identifier": identifier,
            "payload": payload,
            "timestamp": int(p["timestamp"]),
        }
        self._state.meter_events[identifier] = event
        return 200, event

    def _invoice(self, p: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        customer = p.get("customer")
        if customer not in self._state.objects:
            return 400, _error(f"No such customer: '{customer}'", "invalid_request_error")
        pending = [
            o
            for o in self._state.objects.values()
            if o["object"] == "invoiceitem" and o["customer"] == customer and o["invoice"] is None
        ]
        if p.get("pending_invoice_items_behavior") != "include" or not pending:
            return 400, _error("Nothing to invoice for customer", "invalid_request_error")
        invoice = {
            "id": self._new_id("in"),
            "object": "invoice",
            "customer": customer,
            "status": "draft",
            "currency": p.get("currency"),
            "metadata": p.get("metadata", {}),
            "lines": [i["id"] for i in pending],
            "total": sum(i["amount"] for i in pending),
        }
        for item in pending:
            item["invoice"] = invoice["id"]
        return 200, self.add_locked(invoice)


def _list(items: Any) -> dict[str, Any]:
    data = list(items)
    return {"object": "list", "data": data, "has_more": False}


def _error(message: str, error_type: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type}}


def _fault_headers(fault: Fault) -> dict[str, str]:
    headers = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = fault.retry_after
    if fault.should_retry is not None:
        headers["Stripe-Should-Retry"] = fault.should_retry
    return headers
