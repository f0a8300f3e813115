"""The training tests run the real embedded model, with the scorer tests' one-thread rule."""

from tests.scorer.conftest import one_torch_thread, scoring_model  # noqa: F401  (fixtures, re-registered here)
