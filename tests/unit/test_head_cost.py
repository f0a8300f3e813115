"""bench/head_cost.py's pure parts: configuration names and the table it prints."""

from __future__ import annotations

from bench.head_cost import Config, flatness, format_table, parse_config


def test_a_configuration_is_a_head_set_with_an_optional_adapter() -> None:
    assert parse_config("smollm2-135m-instruct") == Config("smollm2-135m-instruct", None)
    assert parse_config("smollm2-135m-instruct-hard+smollm2-traces-lora") == Config(
        "smollm2-135m-instruct-hard", "smollm2-traces-lora")
    assert parse_config("a+b").label == "a + b"


def test_the_table_reports_per_token_costs_and_their_ratio() -> None:
    table = format_table({"a": {"deepest": 8.0, "2k": 0.25, "27k": 0.40}}, {"2k": 2086, "27k": 25958})
    assert "| a | 8 | 0.250 | 0.400 | 1.60 |" in table
    assert "2k: 2,086 context tokens, 27k: 25,958 context tokens" in table
    assert flatness(0.3, 0.36) == 0.36 / 0.3
