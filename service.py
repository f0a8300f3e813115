"""The Bento's entry point (`bentoml serve service:Gateway`, `bentofile.yaml`): the services live in
`ccproxy/service.py`, so that an installed package serves the same thing (`ccproxy serve`)."""

from ccproxy.service import Compressor, EmbeddedLLM, Gateway

__all__ = ["Compressor", "EmbeddedLLM", "Gateway"]
