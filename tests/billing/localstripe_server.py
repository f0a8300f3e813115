"""Runs localstripe (PyPI, a stateful fake Stripe) on 127.0.0.1:PORT for the billing tests:

    python tests/billing/localstripe_server.py PORT

localstripe 1.15 predates parts of today's invoicing API that the invoice-items mode uses,
so this launcher fills exactly those gaps, on localstripe's own objects, and nothing else:
- one-off invoices: POST /v1/invoices without a subscription (localstripe answers 404 "No
  upcoming invoices for customer") takes the customer's pending invoice items, as Stripe does
  with pending_invoice_items_behavior=include;
- POST /v1/invoices/{id}/finalize, which localstripe lacks (draft -> open);
- invoice items' `period[start]`/`period[end]` (localstripe only knows period_start/_end).
It also keeps localstripe from reading or writing its state file (/tmp/localstripe.pickle,
shared by every localstripe on the machine) and listens on loopback only.
Not filled: Idempotency-Key (ignored by localstripe) and billing meters (absent); the tests
cover both against tests/billing/fake_stripe.py.
"""

from __future__ import annotations

import sys
from typing import Any

from aiohttp import web
from localstripe import resources, server
from localstripe.errors import UserError

resources.Store.dump_to_disk = lambda self: None
resources.Store.try_load_from_disk = lambda self: None

Invoice = resources.Invoice
InvoiceItem = resources.InvoiceItem
_subscription_invoice = Invoice._api_create


def _create_invoice(
    customer: Any = None,
    subscription: Any = None,
    description: Any = None,
    metadata: Any = None,
    pending_invoice_items_behavior: Any = None,
    auto_advance: Any = None,
    currency: Any = None,
    **kwargs: Any,
) -> Any:
    if subscription is not None:
        return _subscription_invoice(
            customer=customer,
            subscription=subscription,
            description=description,
            metadata=metadata,
            **kwargs,
        )
    if pending_invoice_items_behavior != "include":
        raise UserError(400, "only pending_invoice_items_behavior=include is supported here")
    resources.Customer._api_retrieve(customer)  # 404 if unknown
    pending = InvoiceItem._api_list_all(None, customer=customer, limit=99)._list
    if not pending:
        raise UserError(400, "Nothing to invoice for customer")
    # Invoice() takes in the customer's pending items itself.
    return Invoice(customer=customer, description=description, metadata=metadata)


def _create_invoice_item(period: Any = None, **data: Any) -> Any:
    if isinstance(period, dict):
        data.setdefault("period_start", period.get("start"))
        data.setdefault("period_end", period.get("end"))
    return InvoiceItem(**data)


def _finalize(id: str, auto_advance: Any = None, **kwargs: Any) -> Any:
    invoice = Invoice._api_retrieve(id)
    if invoice.status != "draft":
        raise UserError(400, "This invoice is already finalized")
    invoice._finalize()
    return invoice


Invoice._api_create = staticmethod(_create_invoice)
InvoiceItem._api_create = staticmethod(_create_invoice_item)
server.app.router.add_route(
    "POST", "/v1/invoices/{id}/finalize", server.api_extra(_finalize, "/v1/invoices/{id}/finalize")
)


if __name__ == "__main__":
    web.run_app(server.app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
