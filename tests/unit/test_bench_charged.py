"""The compressor benchmark's shared passes (`Charged`) serve the product's FusedScorer, which asks
its scorers in batches: the combined methods broke once when FusedScorer went batched."""

from __future__ import annotations

from collections.abc import Sequence

from bench.compressor_bench import Charged
from ccproxy.compression.fused import FusedScorer


class Lengths:
    tokenizer = None

    def __init__(self) -> None:
        self.calls = 0

    def score(self, query: str, units: Sequence[str]) -> list[float]:
        self.calls += 1
        return [float(len(unit)) for unit in units]


def test_a_charged_pass_is_computed_once_and_booked_to_every_method_that_uses_it() -> None:
    qr, dense = Lengths(), Lengths()
    charged_qr, charged_dense = Charged(qr, "score"), Charged(dense, "score")
    fused = FusedScorer(charged_qr, charged_dense, "fusion", weight=0.5)
    units = ["a", "bbb", "cc"]
    scores = fused.score("q", units)
    assert max(range(3), key=scores.__getitem__) == 1  # both scorers rank the longest first
    assert charged_qr.score("q", units) == [1.0, 3.0, 2.0]  # the batched call's result, reused
    assert (qr.calls, dense.calls) == (1, 1)
    assert charged_qr.charged >= charged_qr.spent  # booked twice, computed once
