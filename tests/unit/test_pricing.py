"""The price table: parsing, model matching and the cost maths (pure)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from ccproxy.pricing import (
    PriceTable,
    PriceTableError,
    load_table,
    parse_table,
    to_micro,
    to_minor,
)

TABLE = parse_table(
    """{"default": {"input": "10", "cached_input": "5", "output": "30"},
        "compress": {"input": "0.40"},
        "models": {
          "gpt-4o": {"input": "2.50", "cached_input": "1.25", "output": "10.00"},
          "gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.6},
          "gpt-4": {"input": "30", "output": "60"},
          "llama3": {"input": "0", "output": "0"},
          "claude-3-5-sonnet*": {"input": "3", "cached_input": "0.30", "output": "15"}}}"""
)


@pytest.mark.parametrize(
    ("model", "row"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),  # dated snapshot
        ("gpt-4o-mini", "gpt-4o-mini"),  # its own row, never gpt-4o's
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4o-latest", "gpt-4o"),
        ("llama3:8b", "llama3"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet*"),
        ("gpt-4o-audio-preview", "default"),  # another model: not a snapshot suffix
        ("gpt-4-turbo", "default"),
        ("GPT-4O", "default"),  # case matters
        ("", "default"),
        ("o1", "default"),
    ],
)
def test_a_model_takes_the_exact_row_then_a_snapshot_then_a_wildcard_then_default(
    model: str, row: str
) -> None:
    assert TABLE.row(model)[0] == row


def test_cost_lines_are_exact_and_the_input_lines_are_tokens_after_times_price() -> None:
    cost = TABLE.cost("gpt-4o-2024-08-06", 1_000_000, 400_000, 50_000)
    assert [(x.token_class, x.tokens, x.price_per_million, x.amount) for x in cost.lines] == [
        ("input", 600_000, Decimal("2.50"), Decimal("1.5")),
        ("cached_input", 400_000, Decimal("1.25"), Decimal("0.5")),
        ("output", 50_000, Decimal("10.00"), Decimal("0.5")),
    ]
    assert cost.total == Decimal("2.5")
    # With no cached tokens, the input line is tokens after compression x the input price.
    plain = TABLE.cost("gpt-4o", 1_234_567, 0, 0)
    assert plain.total == Decimal(1_234_567) * Decimal("2.50") / 1_000_000
    # A number, not a string, in the JSON keeps its decimal value (no float detour).
    assert TABLE.row("gpt-4o-mini")[1].cached_input == Decimal("0.075")


def test_cached_tokens_never_exceed_the_prompt_and_negatives_are_refused() -> None:
    cost = TABLE.cost("gpt-4o", 100, 150, 0)
    assert [(x.token_class, x.tokens) for x in cost.lines][:2] == [("input", 0), ("cached_input", 100)]
    with pytest.raises(ValueError, match="completion_tokens"):
        TABLE.cost("gpt-4o", 1, 0, -1)


def test_compress_is_priced_per_token_scored_whatever_the_model() -> None:
    cost = TABLE.usage_cost("compress", "gpt-4", 3_000_000, 600_000, 0, 0)
    ((line,),) = (cost.lines,)
    assert (line.token_class, line.priced_as, line.tokens, line.amount) == (
        "compress",
        "compress",
        3_000_000,
        Decimal("1.2"),
    )
    # An unknown kind is priced as chat, not given away.
    assert TABLE.usage_cost("batch", "gpt-4o", 0, 1_000_000, 0, 0).total == Decimal("2.5")


def test_defaults_cached_input_falls_back_to_input_and_compress_to_default_input() -> None:
    table = parse_table('{"default": {"input": "2", "output": "8"}}')
    assert table.default.cached_input == Decimal("2")
    assert table.compress == Decimal("2")
    flat = PriceTable.flat(Decimal("2.50"))
    assert flat.cost("any", 1_000_000, 0, 1_000_000).total == Decimal("5")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"models": {}}', "'default' row"),
        ('{"default": {"input": "1"}}', "'output' is required"),
        ('{"default": {"input": "-1", "output": "1"}}', "between 0"),
        ('{"default": {"input": "NaN", "output": "1"}}', "between 0"),
        ('{"default": {"input": "1e7", "output": "1"}}', "between 0"),
        ('{"default": {"input": "x", "output": "1"}}', "not a number"),
        ('{"default": {"input": true, "output": "1"}}', "number or a decimal string"),
        ('{"default": {"input": "1", "output": "1", "cache": "1"}}', "unknown field"),
        ('{"default": {"input": "1", "output": "1"}, "model": {}}', "unknown top-level"),
        ('{"default": {"input": "1", "output": "1"}, "models": {" x": {}}}', "usable model"),
        ('{"default": {"input": "1", "output": "1"}, "compress": {"output": "1"}}', "compress"),
        ("{not json", "does not parse"),
        ("[]", "must be an object"),
    ],
)
def test_a_bad_table_is_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(PriceTableError, match=message):
        parse_table(text)


def test_load_table_reads_inline_json_json_and_toml_files(tmp_path: Path) -> None:
    assert load_table(None, Decimal("3")) == PriceTable.flat(Decimal("3"))
    assert load_table("  ", Decimal("3")) == PriceTable.flat(Decimal("3"))
    inline = '{"default": {"input": "1", "output": "2"}}'
    assert load_table(inline, Decimal("3")).default.output == Decimal("2")
    as_json = tmp_path / "prices.json"
    as_json.write_text(inline)
    assert load_table(str(as_json), Decimal("3")) == load_table(inline, Decimal("3"))
    as_toml = tmp_path / "prices.toml"
    as_toml.write_text(
        '[default]\ninput = 1\noutput = "2"\n[models."gpt-4o"]\ninput = 2.5\noutput = 10.1\n'
    )
    table = load_table(str(as_toml), Decimal("3"))
    assert table.row("gpt-4o-2024-08-06")[1].output == Decimal("10.1")
    with pytest.raises(PriceTableError, match="cannot read"):
        load_table(str(tmp_path / "missing.json"), Decimal("3"))


@pytest.mark.parametrize(
    ("amount", "cents", "micro"),
    [
        ("0.004999", 0, 4999),
        ("0.005", 1, 5000),  # half a cent rounds up
        ("0.0000005", 0, 1),  # half a millionth rounds up
        ("0.00000049", 0, 0),
        ("1234.567891", 123457, 1234567891),
    ],
)
def test_rounding_is_half_up_to_the_cent_or_the_millionth(
    amount: str, cents: int, micro: int
) -> None:
    assert to_minor(Decimal(amount)) == cents
    assert to_micro(Decimal(amount)) == micro
