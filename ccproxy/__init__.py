"""ccproxy: a context-compression proxy for OpenAI-compatible LLM APIs."""

__version__ = "0.1.0"
