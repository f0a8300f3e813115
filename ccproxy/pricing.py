"""The price table: what one million tokens of each class cost, per model. Pure: no I/O
beyond reading the table's file once, no clock.

Token classes, and the tokens of a usage row each one prices:

    input         chat: tokens after compression that the provider did not bill as cached
                  (tokens_after - cached_tokens). The product rule "invoice = tokens after
                  compression x price" is this line plus the cached one; with no separate cached
                  price the two add up to exactly tokens_after x input price.
    cached_input  chat: prompt tokens the provider served from its prompt cache
                  (usage.prompt_tokens_details.cached_tokens), at most tokens_after.
    output        chat: completion tokens.
    compress      /v1/compress: the tokens scored (tokens_before), at the table's `compress`
                  price; no provider is involved, so the model does not matter.

The table (CCPROXY_BILLING_PRICES: inline JSON, or the path of a .json or .toml file), prices
in the billing currency's main unit per million tokens, as decimal strings or numbers:

    {"default":  {"input": "2.50", "cached_input": "1.25", "output": "10.00"},
     "compress": {"input": "0.50"},
     "models": {"gpt-4o":      {"input": "2.50", "cached_input": "1.25", "output": "10.00"},
                "gpt-4o-mini": {"input": "0.15", "cached_input": "0.075", "output": "0.60"}}}

`default` is required (it prices every model the table does not name); `cached_input` falls
back to the row's `input`; `compress` falls back to the default row's `input`.

Model names, first rule that matches:
1. exact: "gpt-4o" -> "gpt-4o";
2. a listed name plus a snapshot or tag suffix: `-YYYY-MM-DD`, `-YYYYMMDD`, `-MMDD`,
   `-latest`, `@<tag>` or `:<tag>` ("gpt-4o-2024-08-06" -> "gpt-4o", "gpt-4-0613" ->
   "gpt-4", "llama3:8b" -> "llama3"). Only such suffixes: "gpt-4o-mini" is another model
   and never takes "gpt-4o"'s price (list it, or it is priced by `default`);
3. a listed name ending in `*`: the longest such prefix the model starts with
   ("claude-3-5-sonnet*");
4. `default`. Set it to your dearest price, so that an unlisted model is never cheap.
Case matters, as it does to providers.

Money: amounts here are exact Decimals (tokens x price / 10^6, no rounding). Rounding happens
once, where money leaves ccproxy, with `to_minor` (cents, half-up) or `to_micro` (millionths
of the main unit, half-up); each caller documents where.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

TokenClass = Literal["input", "cached_input", "output", "compress"]
TOKEN_CLASSES: tuple[TokenClass, ...] = ("input", "cached_input", "output", "compress")
Kind = Literal["chat", "compress"]
KINDS: tuple[Kind, ...] = ("chat", "compress")

TOKENS_PER_PRICE = 1_000_000  # prices are per million tokens
MINOR_PER_MAJOR = 100  # cents per main unit (a currency with cents is assumed)
MICRO_PER_MAJOR = 1_000_000  # the meters mode's unit: millionths of the main unit
# What may follow a listed name for a model to take its price: dated snapshots and tags.
_SNAPSHOT_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}|-\d{8}|-\d{4}|-latest|[@:][\w.-]+")
# A price above this is a typo (a million tokens for a million dollars), not a price.
_MAX_PRICE = Decimal(1_000_000)
_ROW_FIELDS = frozenset({"input", "cached_input", "output"})


class PriceTableError(ValueError):
    """The price table is missing, malformed or has an impossible price."""


@dataclass(frozen=True)
class ModelPrice:
    """Prices per million tokens, in the billing currency's main unit."""

    input: Decimal
    cached_input: Decimal
    output: Decimal

    def of(self, token_class: TokenClass) -> Decimal:
        return self.input if token_class in ("input", "compress") else getattr(self, token_class)


@dataclass(frozen=True)
class CostLine:
    """One token class of one usage row, priced: `amount` is exact (not rounded)."""

    token_class: TokenClass
    priced_as: str  # the table row that priced it: a model name, "default" or "compress"
    tokens: int
    price_per_million: Decimal
    amount: Decimal


@dataclass(frozen=True)
class Cost:
    lines: tuple[CostLine, ...]

    @property
    def total(self) -> Decimal:
        return sum((x.amount for x in self.lines), Decimal(0))


@dataclass(frozen=True)
class PriceTable:
    default: ModelPrice
    compress: Decimal
    models: Mapping[str, ModelPrice] = field(default_factory=dict)

    @classmethod
    def flat(cls, price_per_million: Decimal) -> PriceTable:
        """The table when none is configured: one price for every token of every class."""
        p = _price(price_per_million, "CCPROXY_BILLING_PRICE_PER_MILLION_TOKENS")
        return cls(ModelPrice(p, p, p), p, {})

    def row(self, model: str) -> tuple[str, ModelPrice]:
        """(the name of the row that prices `model`, its prices): see the module docstring."""
        exact = self.models.get(model)
        if exact is not None:
            return model, exact
        snapshot: str | None = None
        wildcard: str | None = None
        for name in self.models:
            if name.endswith("*"):
                if model.startswith(name[:-1]) and (wildcard is None or len(name) > len(wildcard)):
                    wildcard = name
            elif (
                model.startswith(name)
                and _SNAPSHOT_SUFFIX.fullmatch(model, len(name))
                and (snapshot is None or len(name) > len(snapshot))
            ):
                snapshot = name
        best = snapshot or wildcard
        if best is not None:
            return best, self.models[best]
        return "default", self.default

    def cost(
        self,
        model: str,
        prompt_tokens_after: int,
        cached_tokens: int,
        completion_tokens: int,
    ) -> Cost:
        """A chat row's cost: input, cached input and output lines (zero-token lines kept)."""
        for name, value in (
            ("prompt_tokens_after", prompt_tokens_after),
            ("cached_tokens", cached_tokens),
            ("completion_tokens", completion_tokens),
        ):
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        cached = min(cached_tokens, prompt_tokens_after)
        name, price = self.row(model)
        return Cost(
            (
                _line("input", name, prompt_tokens_after - cached, price.input),
                _line("cached_input", name, cached, price.cached_input),
                _line("output", name, completion_tokens, price.output),
            )
        )

    def compress_cost(self, tokens_scored: int) -> Cost:
        if tokens_scored < 0:
            raise ValueError(f"tokens_scored must not be negative, got {tokens_scored}")
        return Cost((_line("compress", "compress", tokens_scored, self.compress),))

    def usage_cost(
        self,
        kind: str,
        model: str,
        tokens_before: int,
        tokens_after: int,
        cached_tokens: int,
        completion_tokens: int,
    ) -> Cost:
        """The cost of a usage row (an event, or an hourly sum of one model and kind)."""
        if kind == "compress":
            return self.compress_cost(tokens_before)
        # "chat", and any kind this version does not know: priced as chat, not given away.
        return self.cost(model, tokens_after, cached_tokens, completion_tokens)


def _line(token_class: TokenClass, name: str, tokens: int, price: Decimal) -> CostLine:
    return CostLine(token_class, name, tokens, price, Decimal(tokens) * price / TOKENS_PER_PRICE)


# --- rounding --------------------------------------------------------------------------------
def to_minor(amount: Decimal) -> int:
    """An amount in cents, rounded half-up (0.5 cent -> 1 cent)."""
    return int((amount * MINOR_PER_MAJOR).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def to_micro(amount: Decimal) -> int:
    """An amount in millionths of the main unit, rounded half-up."""
    return int((amount * MICRO_PER_MAJOR).quantize(Decimal(1), rounding=ROUND_HALF_UP))


# --- parsing ---------------------------------------------------------------------------------
def _price(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        raise PriceTableError(f"{where}: a price must be a number or a decimal string")
    try:
        # str() first: a float from a TOML or JSON reader that did not keep Decimals would
        # otherwise bring its binary error along (0.1 -> 0.1000000000000000055...).
        price = Decimal(str(value).strip())
    except InvalidOperation:
        raise PriceTableError(f"{where}: {value!r} is not a number") from None
    if not price.is_finite() or price < 0 or price > _MAX_PRICE:
        raise PriceTableError(f"{where}: a price must be between 0 and {_MAX_PRICE}")
    return price


def _row(value: Any, where: str) -> ModelPrice:
    if not isinstance(value, Mapping):
        raise PriceTableError(f"{where}: expected an object with input, cached_input, output")
    unknown = set(value) - _ROW_FIELDS
    if unknown:
        raise PriceTableError(f"{where}: unknown field(s) {sorted(unknown)}")
    for required in ("input", "output"):
        if required not in value:
            raise PriceTableError(f"{where}: '{required}' is required")
    input_price = _price(value["input"], f"{where}.input")
    cached = value.get("cached_input")
    return ModelPrice(
        input_price,
        input_price if cached is None else _price(cached, f"{where}.cached_input"),
        _price(value["output"], f"{where}.output"),
    )


def table_from_data(data: Any) -> PriceTable:
    """A validated table from parsed JSON/TOML (see the module docstring for the shape)."""
    if not isinstance(data, Mapping):
        raise PriceTableError("the price table must be an object")
    unknown = set(data) - {"default", "compress", "models"}
    if unknown:
        raise PriceTableError(f"unknown top-level field(s) {sorted(unknown)}")
    if "default" not in data:
        raise PriceTableError("the price table needs a 'default' row (for unlisted models)")
    default = _row(data["default"], "default")
    compress: Decimal = default.input
    if "compress" in data:
        section = data["compress"]
        if not isinstance(section, Mapping) or set(section) != {"input"}:
            raise PriceTableError("compress: expected {\"input\": <price per million tokens>}")
        compress = _price(section["input"], "compress.input")
    models_data = data.get("models", {})
    if not isinstance(models_data, Mapping):
        raise PriceTableError("models: expected an object of model name -> prices")
    models: dict[str, ModelPrice] = {}
    for name, row in models_data.items():
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise PriceTableError(f"models: {name!r} is not a usable model name")
        models[name] = _row(row, f"models.{name}")
    return PriceTable(default, compress, models)


def parse_table(text: str, *, toml: bool = False) -> PriceTable:
    try:
        if toml:
            import tomllib  # Python 3.11+

            data = tomllib.loads(text, parse_float=Decimal)
        else:
            data = json.loads(text, parse_float=Decimal)
    except ImportError:
        raise PriceTableError("a TOML price table needs Python 3.11 or later") from None
    except ValueError as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise PriceTableError(f"the price table does not parse: {exc}") from None
    return table_from_data(data)


def load_table(setting: str | None, flat_price: Decimal) -> PriceTable:
    """The table a CCPROXY_BILLING_PRICES value names: inline JSON (it starts with `{`), or a
    .json/.toml file. Unset or blank: one flat price for every class (the pre-table rule)."""
    if setting is None or not setting.strip():
        return PriceTable.flat(flat_price)
    text = setting.strip()
    if text.startswith("{"):
        return parse_table(text)
    path = Path(text).expanduser()
    try:
        content = path.read_text("utf-8")
    except OSError as exc:
        raise PriceTableError(f"cannot read the price table {str(path)!r}: {exc.strerror}") from None
    return parse_table(content, toml=path.suffix.lower() == ".toml")
