"""bench/head_cost.py's pure parts: configuration names and the table it prints."""

from __future__ import annotations

from bench.head_cost import Config, flatness, format_table, parse_config


def test_a_configuration_is_a_head_set_with_an_optional_adapter_and_window_plan() -> None:
    assert parse_config("smollm2-135m-instruct") == Config("smollm2-135m-instruct", None)
    assert parse_config("smollm2-135m-instruct-hard+smollm2-traces-lora") == Config(
        "smollm2-135m-instruct-hard", "smollm2-traces-lora")
    assert parse_config("a+b").label == "a + b"
    assert parse_config("a@2560/0") == Config("a", None, (2560, 0))
    assert parse_config("a+b@3072/256").label == "a + b @ 3072/256"
    assert parse_config("a@4096").window == (4096, 0)


def test_the_table_reports_per_token_costs_and_the_highest_over_the_first() -> None:
    table = format_table({"a": {"deepest": 8.0, "2.1k": 0.25, "2.6k": 0.45, "26.0k": 0.40}}, [2086, 2586, 25958])
    assert "| configuration | deepest layer | ms/token at 2.1k | ms/token at 2.6k | ms/token at 26.0k | highest / 2.1k |" in table
    assert "| a | 8 | 0.250 | 0.450 | 0.400 | 1.80 |" in table
    assert "Context tokens: 2,086, 2,586, 25,958" in table
    assert flatness([0.3, 0.36]) == 0.36 / 0.3
