"""Settings that must not reach production: checked once when the service starts.

A deployment says it is production with ``CCPROXY_ENVIRONMENT=production``; then the service
refuses to start rather than expose something by accident. Development (the default) keeps
`make serve` working with no configuration at all.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ccproxy.settings import Settings


class UnsafeConfiguration(RuntimeError):
    """The settings would expose something in production; the message says how to fix it."""


class DataDirUnwritable(RuntimeError):
    """CCPROXY_DATA_DIR cannot hold the usage outbox; the message says how to fix it."""


def writable_data_dir(path: Path) -> Path:
    """Creates ``path`` and proves this process can write there, before the outbox opens in it.

    A container volume mounted owned by root, with the image running as its own user, otherwise
    ends in SQLite's "unable to open database file" deep in a traceback.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ccproxy-write-check-"):
            pass
    except OSError as error:
        raise DataDirUnwritable(
            f"CCPROXY_DATA_DIR={path} is not writable by this process (uid {os.getuid()}): "
            f"{type(error).__name__}: {error.strerror}. The durable usage outbox lives there: make it "
            "writable by this user (a container volume: chown it to the image's user, uid 1034 in the "
            "Bento image), or set CCPROXY_DATA_DIR to a folder that is."
        ) from None
    return path


def production_problems(settings: Settings) -> list[str]:
    """What production mode refuses, one sentence each; empty when the settings are fine."""
    if settings.environment != "production":
        return []
    problems = []
    if settings.metrics_token is None and not settings.metrics_allow_open:
        problems.append(
            "/metrics would be open to anyone: set CCPROXY_METRICS_TOKEN, or "
            "CCPROXY_METRICS_ALLOW_OPEN=true when a network policy already keeps it private."
        )
    if settings.compressor_url is not None and settings.compressor_token is None:
        problems.append(
            "the remote Compressor (CCPROXY_COMPRESSOR_URL) would be called without a shared "
            "secret: set CCPROXY_COMPRESSOR_TOKEN on the Gateway and on the Compressor."
        )
    return problems


def refuse_unsafe_start(settings: Settings) -> None:
    problems = production_problems(settings)
    if problems:
        raise UnsafeConfiguration(
            "ccproxy refuses to start in production mode (CCPROXY_ENVIRONMENT=production): "
            + " ".join(problems)
        )
