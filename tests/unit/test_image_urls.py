"""Which image URLs a chat request may carry to the upstream (ccproxy/image_urls.py)."""

from __future__ import annotations

import pytest

from ccproxy.image_urls import ImageUrlPolicy, check_image_urls, policy_for
from ccproxy.protocol import ProxyError
from ccproxy.settings import Settings

DATA = "data:image/png;base64,iVBORw0KGgo="


def _body(*urls: object, legacy: bool = False) -> dict:
    parts: list[dict] = [{"type": "text", "text": "what is this?"}]
    for url in urls:
        parts.append({"type": "image_url", "image_url": url if legacy else {"url": url, "detail": "low"}})
    return {"model": "m", "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": parts}]}


def _refused(body: dict, policy: ImageUrlPolicy) -> ProxyError:
    with pytest.raises(ProxyError) as caught:
        check_image_urls(body, policy)
    return caught.value


@pytest.mark.parametrize(
    ("upstream", "hosts", "expected"),
    [
        (None, None, frozenset()),  # the embedded model: data: only
        ("http://127.0.0.1:8000/v1", None, frozenset()),  # a self-hosted vLLM
        ("http://ollama.internal:11434/v1", None, frozenset()),
        ("https://api.openai.com/v1", None, None),  # the provider fetches from its own network
        ("https://api.openai.com/v1", [], frozenset()),  # the setting wins
        ("http://127.0.0.1:8000/v1", ["*"], None),
        ("http://127.0.0.1:8000/v1", ["Img.Example.com.", " *.cdn.example "], frozenset({"img.example.com", "*.cdn.example"})),
    ],
)
def test_the_default_depends_on_the_upstream_and_the_setting_wins(upstream, hosts, expected) -> None:
    assert policy_for(Settings(upstream_url=upstream, image_url_hosts=hosts)).hosts == expected


def test_data_only_refuses_every_fetchable_url_and_names_the_field_not_the_url() -> None:
    policy = ImageUrlPolicy(frozenset())
    check_image_urls(_body(DATA, DATA.upper()[:5] + DATA[5:]), policy)
    check_image_urls({"model": "m", "messages": [{"role": "user", "content": "no parts"}]}, policy)
    for url in ("http://169.254.169.254/latest/meta-data/", "https://example.com/cat.png", "file:///etc/passwd",
                "//evil.example/x.png", " data:x", 7, None):
        error = _refused(_body(DATA, url), policy)
        assert (error.status, error.code, error.type) == (400, "invalid_image_url", "invalid_request_error")
        assert error.param == "messages[1].content[2].image_url.url"
        assert str(url) not in error.message or url in (7, None)
        assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    assert _refused(_body("http://10.0.0.1/x", legacy=True), policy).code == "invalid_image_url"  # string form


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://img.example.com/cat.png", True),
        ("http://IMG.EXAMPLE.COM./cat.png", True),
        ("https://a.cdn.example/x.png", True),
        ("https://cdn.example/x.png", False),  # *.cdn.example is its subdomains only
        ("https://img.example.com.evil.test/x.png", False),
        ("https://evil.test/?img.example.com", False),
        ("https://img.example.com@169.254.169.254/", False),  # user info: another host behind it
        ("https://evil.test\\@img.example.com/", False),  # parsers disagree on backslashes
        ("https://img.example.com\t.evil.test/", False),
        ("ftp://img.example.com/x.png", False),
        ("https://[::1]/x.png", False),
        ("gopher://img.example.com:70/", False),
        ("https:///x.png", False),
    ],
)
def test_listed_hosts(url: str, allowed: bool) -> None:
    assert ImageUrlPolicy(frozenset({"img.example.com", "*.cdn.example"})).allows(url) is allowed


def test_any_host_checks_nothing() -> None:
    check_image_urls(_body("http://169.254.169.254/", "https://x.test/"), ImageUrlPolicy(None))
