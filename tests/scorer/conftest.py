"""The scorer tests run the real embedded model (SmolLM2-135M-Instruct), loaded once per session.

The first run on a machine converts the shipped GGUF (~35 s) into the model cache; later runs
load the cached checkpoint in a second or two.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from ccproxy.compression.heads import load_head_set
from ccproxy.compression.model import ScoringModel, load_scoring_model
from ccproxy.compression.qrhead import QRHeadScorer


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread. When another process holds one of the two cores, torch's two
    OpenMP threads spin-wait on each other and a 0.3 s scoring call takes 5-9 s (measured);
    one thread is never slower than ~1.5x the quiet two-thread time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def scoring_model() -> ScoringModel:
    """The model as the service loads it (bf16 where the CPU has native bf16, else float32)."""
    return load_scoring_model()


@pytest.fixture(scope="session")
def float32_model() -> ScoringModel:
    """A float32 copy, for comparisons against eager attention at tight tolerances."""
    return load_scoring_model(dtype=torch.float32)


@pytest.fixture(scope="session")
def shipped_heads(scoring_model: ScoringModel) -> list[tuple[int, int]]:
    heads = load_head_set(scoring_model.name)
    assert heads, f"no head set shipped for {scoring_model.name}"
    return heads


@pytest.fixture(scope="session")
def scorer(scoring_model: ScoringModel, shipped_heads: list[tuple[int, int]]) -> QRHeadScorer:
    return QRHeadScorer(scoring_model.model, scoring_model.tokenizer, shipped_heads)
