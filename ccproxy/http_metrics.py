"""BentoML's HTTP request metrics with a bounded ``endpoint`` label.

BentoML 1.4 (``bentoml._internal.server.http.instruments``) labels
``*_request_total``, ``*_request_duration_seconds`` and ``*_request_in_progress`` with
``endpoint=scope["path"]``, the raw path of every request, and its middleware runs outside
every middleware a service can add. So a caller without any key could create one Prometheus
series per random path it sends: unbounded memory in every worker and on the Prometheus server.

``bound_endpoint_labels`` swaps BentoML's metrics middleware for a subclass whose metrics map
any path that is not a known route to ``endpoint="other"``. It must run before BentoML builds
the service's ASGI app (``service.py`` calls it at import, which BentoML's worker does first).
This leans on a private BentoML module: ``bentoml`` is pinned in pyproject.toml, and
``tests/e2e/test_security.py`` sends random paths and checks that ``/metrics`` gains no series.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

OTHER_ENDPOINT = "other"
# BentoML's own routes on every service (health, metrics, its API docs and index page).
BENTOML_ROUTES = frozenset({"/", "/livez", "/readyz", "/healthz", "/metrics", "/docs.json"})
# The metrics BentoML's middleware labels with ``endpoint``.
_ENDPOINT_METRICS = (
    "metrics_request_duration",
    "metrics_request_total",
    "metrics_request_in_progress",
    "metrics_websocket_connections",
    "metrics_websocket_data_received",
    "metrics_websocket_data_sent",
)


def endpoint_label(path: str, known: frozenset[str]) -> str:
    return path if path in known else OTHER_ENDPOINT


class _BoundedEndpoint:
    """A prometheus metric whose ``endpoint`` label values are limited to ``known`` paths."""

    def __init__(self, metric: Any, known: frozenset[str]) -> None:
        self._metric = metric
        self._known = known

    def labels(self, *args: Any, **labels: Any) -> Any:
        if "endpoint" in labels:
            labels["endpoint"] = endpoint_label(str(labels["endpoint"]), self._known)
        return self._metric.labels(*args, **labels)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metric, name)


def _bounded(base: type, known_paths: frozenset[str]) -> type:
    class Bounded(base):  # type: ignore[misc, valid-type]
        _ccproxy_bounded = True

        def _setup(self, *args: Any, **kwargs: Any) -> None:
            super()._setup(*args, **kwargs)
            from bentoml._internal.context import server_context

            # The service's own API routes (the Compressor's /score, …) are known too.
            known = known_paths | BENTOML_ROUTES | frozenset(server_context.service_routes or ())
            for name in _ENDPOINT_METRICS:
                if hasattr(self, name):
                    setattr(self, name, _BoundedEndpoint(getattr(self, name), known))

    Bounded.__name__ = Bounded.__qualname__ = f"Bounded{base.__name__}"
    return Bounded


def bound_endpoint_labels(known_paths: Iterable[str]) -> None:
    """Make BentoML's request metrics label unknown paths ``other`` in this process."""
    from bentoml._internal.server.http import instruments

    known = frozenset(known_paths)
    for name in ("RunnerTrafficMetricsMiddleware", "HTTPTrafficMetricsMiddleware"):
        base = getattr(instruments, name)
        if not getattr(base, "_ccproxy_bounded", False):
            setattr(instruments, name, _bounded(base, known))


def static_paths(app: Any) -> set[str]:
    """The paths of an ASGI app's routes that take no path parameter."""
    return {route.path for route in getattr(app, "routes", []) if "{" not in getattr(route, "path", "{")}
