"""ccproxy: a context-compression proxy for OpenAI-compatible LLM APIs.

``ccproxy.compress(messages, ratio=..., budget=...)`` compresses chat messages in-process,
exactly as the proxy does before forwarding (``acompress`` inside an event loop).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["acompress", "compress"]

if TYPE_CHECKING:
    from ccproxy.compression.local import acompress, compress


def __getattr__(name: str) -> Any:
    # Lazy: importing ccproxy must not import torch.
    if name in __all__:
        from ccproxy.compression import local

        return getattr(local, name)
    raise AttributeError(name)
