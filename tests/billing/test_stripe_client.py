"""The Stripe client against the recording fake: headers, encoding, retries and errors."""

from __future__ import annotations

import pytest

from billing.job import StripeRequest
from billing.stripe_client import STRIPE_API_VERSION, StripeClient, StripeError
from tests.billing.fake_stripe import FakeStripe
from tests.billing.helpers import Sleeps, client
from tests.usage.helpers import free_port

CUSTOMER = StripeRequest("POST", "/v1/customers", {"name": "acme", "metadata": {"a": "1"}}, "key-1")


def test_requests_carry_auth_version_and_idempotency_key(fake_stripe: FakeStripe) -> None:
    with client(fake_stripe.url) as stripe:
        created = stripe.send(CUSTOMER)
        assert created["id"].startswith("cus_")
        (call,) = fake_stripe.requests
    assert call.headers["authorization"] == "Bearer sk_test_billing"
    assert call.headers["stripe-version"] == STRIPE_API_VERSION
    assert call.headers["idempotency-key"] == "key-1"
    assert call.headers["content-type"] == "application/x-www-form-urlencoded"
    assert call.pairs == [("name", "acme"), ("metadata[a]", "1")]


def test_nested_params_reach_stripe_in_its_form_encoding(fake_stripe: FakeStripe) -> None:
    """Maps as a[b]=, lists as a[0]=, booleans as true/false, None left out, in order."""
    params = {
        "a": 1,
        "payload": {"value": "2", "nested": {"x": True}},
        "items": [{"price": "p1"}, {"price": "p2"}],
        "keys": ["k"],
        "skip": None,
        "flag": False,
    }
    with client(fake_stripe.url) as stripe:
        stripe.send(StripeRequest("POST", "/v1/customers", params, "key-form"))
        stripe.send(StripeRequest("GET", "/v1/billing/meters", {"limit": 3, "expand": ["data.x"]}))
    posted, listed = fake_stripe.requests
    assert posted.pairs == [
        ("a", "1"),
        ("payload[value]", "2"),
        ("payload[nested][x]", "true"),
        ("items[0][price]", "p1"),
        ("items[1][price]", "p2"),
        ("keys[0]", "k"),
        ("flag", "false"),
    ]
    assert (listed.method, listed.pairs) == ("GET", [("limit", "3"), ("expand[0]", "data.x")])
    assert "idempotency-key" not in listed.headers


def test_a_429_is_retried_after_retry_after_with_the_same_key(fake_stripe: FakeStripe) -> None:
    fake_stripe.fail(429, retry_after="2")
    sleeps = Sleeps()
    with client(fake_stripe.url, sleeps) as stripe:
        stripe.send(CUSTOMER)
    assert [r.status for r in fake_stripe.requests] == [429, 200]
    assert {r.idempotency_key for r in fake_stripe.requests} == {"key-1"}
    assert sleeps == [2.0]


def test_retry_after_is_capped(fake_stripe: FakeStripe) -> None:
    fake_stripe.fail(503, retry_after="3600")
    sleeps = Sleeps()
    with client(fake_stripe.url, sleeps) as stripe:
        stripe.send(CUSTOMER)
    assert sleeps == [60.0]


def test_5xx_backs_off_exponentially_and_then_fails_loudly(fake_stripe: FakeStripe) -> None:
    fake_stripe.fail(500, times=10)
    sleeps = Sleeps()
    stripe = StripeClient(
        "sk_test_x",
        fake_stripe.url,
        max_retries=6,
        backoff_base_s=0.5,
        backoff_cap_s=4,
        sleep=sleeps,
    )
    with stripe, pytest.raises(StripeError) as caught:
        stripe.send(CUSTOMER)
    assert caught.value.status == 500 and not caught.value.refused
    assert len(fake_stripe.requests) == 7
    assert len(sleeps) == 6
    # Full delay base x 2^n capped at 4 s, jittered down to at most half.
    for n, slept in enumerate(sleeps):
        full = min(4.0, 0.5 * 2**n)
        assert full / 2 <= slept <= full


def test_409_is_retried_and_should_retry_false_is_obeyed(fake_stripe: FakeStripe) -> None:
    fake_stripe.fail(409)
    with client(fake_stripe.url) as stripe:
        stripe.send(CUSTOMER)
    assert [r.status for r in fake_stripe.requests] == [409, 200]
    fake_stripe.fail(500, should_retry="false")
    with client(fake_stripe.url) as stripe, pytest.raises(StripeError):
        stripe.send(StripeRequest("POST", "/v1/customers", {"name": "b"}, "key-2"))
    assert [r.status for r in fake_stripe.requests][2:] == [500]


def test_a_400_is_not_retried_and_is_reported(fake_stripe: FakeStripe) -> None:
    bad = StripeRequest(
        "POST",
        "/v1/invoiceitems",
        {"customer": "cus_nope", "amount": 1, "currency": "usd"},
        "key-3",
    )
    with client(fake_stripe.url) as stripe, pytest.raises(StripeError) as caught:
        stripe.send(bad)
    error = caught.value
    assert (error.status, error.error_type, error.refused) == (400, "invalid_request_error", True)
    assert "No such customer" in str(error) and "req_fake_" in str(error)
    assert len(fake_stripe.requests) == 1


def test_a_reused_key_with_other_parameters_is_not_a_refusal(fake_stripe: FakeStripe) -> None:
    with client(fake_stripe.url) as stripe:
        stripe.send(CUSTOMER)
        with pytest.raises(StripeError) as caught:
            stripe.send(StripeRequest("POST", "/v1/customers", {"name": "other"}, "key-1"))
    assert caught.value.error_type == "idempotency_error"
    assert not caught.value.refused  # the first request did create something


def test_network_errors_are_retried_then_raised() -> None:
    sleeps = Sleeps()
    stripe = client(f"http://127.0.0.1:{free_port()}", sleeps, max_retries=2)
    with stripe, pytest.raises(StripeError) as caught:
        stripe.send(CUSTOMER)
    assert caught.value.status is None and "ConnectionError" in str(caught.value)
    assert len(sleeps) == 2


def test_a_post_without_an_idempotency_key_is_refused_locally(fake_stripe: FakeStripe) -> None:
    with client(fake_stripe.url) as stripe, pytest.raises(ValueError):
        stripe.send(StripeRequest("POST", "/v1/customers", {"name": "x"}))
    assert fake_stripe.requests == []


def test_the_key_never_shows_in_repr(fake_stripe: FakeStripe) -> None:
    with client(fake_stripe.url) as stripe:
        assert "sk_" not in repr(stripe)
