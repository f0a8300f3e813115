"""The training tests run the real embedded model, with the scorer tests' one-thread rule."""

from tests.scorer.conftest import one_torch_thread  # noqa: F401  (autouse fixture, re-registered here)
