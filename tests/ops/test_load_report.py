"""The load runner's bookkeeping (bench/load.py), without starting anything: batch sizes from two
scrapes of BentoML's histogram, percentiles, and the docs section it rewrites."""

from __future__ import annotations

from pathlib import Path

from bench.load import START_MARK, END_MARK, batch_sizes, percentile, scrape_text, write_section
from locustfiles import shapes

LABELS = ('method_name="score",runner_name="ccproxy-compressor",service_name="ccproxy-compressor",'
          'service_version="not available",worker_index="1"')


def histogram(cumulative: dict[str, float], total: float) -> str:
    """BentoML's adaptive batch size histogram as /metrics shows it."""
    lines = ["# TYPE bentoml_service_adaptive_batch_size histogram"]
    lines += [f'bentoml_service_adaptive_batch_size_bucket{{le="{le}",{LABELS}}} {n}' for le, n in cumulative.items()]
    lines.append(f"bentoml_service_adaptive_batch_size_count{{{LABELS}}} {cumulative['+Inf']}")
    lines.append(f"bentoml_service_adaptive_batch_size_sum{{{LABELS}}} {total}")
    return "\n".join(lines) + "\n"


# One batch of 1 before; then 2 more batches of 1 and 3 batches of 3 or 4 (13 requests in 5 batches).
BEFORE = histogram({"1.0": 1, "2.0": 1, "4.0": 1, "8.0": 1, "16.0": 1, "+Inf": 1}, 1)
AFTER = histogram({"1.0": 3, "2.0": 3, "4.0": 6, "8.0": 6, "16.0": 6, "+Inf": 6}, 14)


def test_batch_sizes_are_the_difference_between_two_scrapes() -> None:
    seen = batch_sizes(scrape_text(BEFORE), scrape_text(AFTER))
    assert seen["batches"] == 5
    assert seen["batch_mean"] == "2.60"
    assert seen["batch_max"] == "≤4"
    assert seen["batch_sizes"] == "≤1: 2, ≤4: 3"


def test_no_batches_no_figures() -> None:
    assert batch_sizes(scrape_text(BEFORE), scrape_text(BEFORE)) == {}


def test_percentile_interpolates_like_numpy() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.5
    assert round(percentile(values, 0.95), 2) == 95.05
    assert percentile([3.0], 0.99) == 3.0


def test_the_section_is_replaced_in_place_or_appended(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nearlier text\n")
    write_section(f"{START_MARK}\nfirst\n{END_MARK}\n", doc)
    write_section(f"{START_MARK}\nsecond\n{END_MARK}\n", doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nearlier text\n")
    assert "second" in text and "first" not in text
    assert text.count(START_MARK) == text.count(END_MARK) == 1


def test_rag_prompts_have_the_sizes_they_claim() -> None:
    sizes = [shapes.prompt_tokens(item.messages()) for item in shapes.rag_items(1100, 20)]
    assert len(sizes) == 20 and all(1012 <= size <= 1100 for size in sizes)
