"""Which ``image_url`` content parts a chat request may forward (server-side request forgery).

An upstream that accepts images fetches an ``image_url`` itself. A public provider does so from
its own network; a self-hosted one (vLLM, Ollama, llama.cpp) from inside yours, where a URL such
as ``http://169.254.169.254/…`` or ``http://db.internal:5432/`` reaches what callers must not.
So, unless CCPROXY_IMAGE_URL_HOSTS says otherwise, only ``data:`` URLs go to upstreams that are
not a known public provider API (the embedded model included).

A URL is checked on the host that ``urllib.parse`` reads, and URLs that parsers read
differently (user info, backslashes, whitespace or control characters) are refused outright,
so the upstream's fetcher cannot see another host than the one checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from ccproxy.protocol import ProxyError
from ccproxy.settings import Settings, get_settings

# Public provider APIs: the image is fetched by the provider, outside the deployment's network.
PUBLIC_PROVIDER_HOSTS = frozenset({
    "api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com", "api.mistral.ai",
    "api.groq.com", "api.together.xyz", "api.fireworks.ai", "openrouter.ai", "api.deepseek.com",
    "api.x.ai",
})
ANY_HOST = "*"
_AMBIGUOUS = re.compile(r"[\\\s\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ImageUrlPolicy:
    """``hosts`` None: any URL; empty: ``data:`` only; else also http(s) on those hosts
    (an entry ``*.example.com`` matches its subdomains)."""

    hosts: frozenset[str] | None

    def allows(self, url: str) -> bool:
        if url[:5].lower() == "data:":
            return True
        if self.hosts is None:
            return True
        if not self.hosts or _AMBIGUOUS.search(url):
            return False
        try:
            parts = urlsplit(url)
        except ValueError:
            return False
        host = (parts.hostname or "").rstrip(".")
        if parts.scheme.lower() not in ("http", "https") or "@" in parts.netloc or not host:
            return False
        return host in self.hosts or any(
            entry.startswith("*.") and host.endswith(entry[1:]) for entry in self.hosts
        )


def policy_for(settings: Settings) -> ImageUrlPolicy:
    configured = settings.image_url_hosts
    if configured is None:
        upstream_host = (urlsplit(settings.upstream_url).hostname or "") if settings.upstream_url else ""
        return ImageUrlPolicy(None if upstream_host.lower() in PUBLIC_PROVIDER_HOSTS else frozenset())
    hosts = frozenset(entry.strip().lower().rstrip(".") for entry in configured if entry.strip())
    return ImageUrlPolicy(None if ANY_HOST in hosts else hosts)


def _image_urls(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(param path, url value) of every image_url part of every message."""
    messages = body.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            if not isinstance(part, dict) or "image_url" not in part:
                continue
            image = part["image_url"]
            url = image.get("url") if isinstance(image, dict) else image  # the old string form too
            yield f"messages[{i}].content[{j}].image_url.url", url


def check_image_urls(body: dict[str, Any], policy: ImageUrlPolicy) -> None:
    """400 ``invalid_image_url`` for the first image URL the policy does not allow; the message
    names the field, never the URL (error bodies quote no request content)."""
    if policy.hosts is None:
        return
    for param, url in _image_urls(body):
        if not isinstance(url, str) or not policy.allows(url):
            raise ProxyError(
                400,
                "This server forwards images only as data: URLs"
                + (" or from its allowed hosts." if policy.hosts else ".")
                + " Send the image base64-encoded (data:image/png;base64,…).",
                param=param,
                code="invalid_image_url",
            )


@lru_cache(maxsize=1)
def _configured_policy(settings: Settings) -> ImageUrlPolicy:
    return policy_for(settings)


def enforce_image_policy(body: dict[str, Any]) -> None:
    """``check_image_urls`` under this process's settings (the chat request's call site)."""
    check_image_urls(body, _configured_policy(get_settings()))
