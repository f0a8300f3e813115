"""Query-focused retrieval-head (QR-head) scoring on a Hugging Face causal LM.

The method is QRHead (Zhang et al., EMNLP 2025) on top of in-context re-ranking (ICR, Chen et
al., ICLR 2025):

* Prompt: the context units first, each its own block, then a late instruction, the query and the
  assistant header. The "query span" is that whole tail (instruction + query + header), as in the
  reference implementation (princeton-pli/QRHead, ``compose_scoring_prompt``).
* Per head h, a context token t scores the mean over the query span's rows i of the attention
  probability A_h[i, t], minus the same quantity with the query replaced by "N/A" (calibration:
  it removes the mass a head puts on a token whatever the question).
* Sum over the head set; inside each unit, drop tokens below mean - 2 std of that unit's token
  scores (outliers such as attention sinks); the unit scores the sum of what is left over its best
  256 consecutive tokens (the whole sum for shorter units, as the reference; ``unit_scores``).

Efficiency (never materialise the full attention matrix):

* The context runs once through the decoder layers with SDPA, up to the deepest layer that holds a
  selected head. At that layer only the keys are projected; the layers after it and the LM head
  never run.
* Both tails (real query and "N/A") then run together as one short sequence against the cached
  context keys/values: each tail sees the context and itself, never the other, and both start at
  the same position, so this equals two separate runs on a shared KV prefix.
* For the selected layers, the post-RoPE query vectors of the tail rows are projected again from
  the layer input (a few dozen rows) and the softmax is recomputed for those rows only, against
  the layer's keys. A query head reads its KV group's keys (GQA).

Contexts longer than one window are scored in overlapping windows of whole units, each window a
complete prompt ending with the query; a unit in several windows gets the mean of its scores.
Each window has its own softmax, so those scores are not comparable across windows (every window
has a winner, and a short window inflates its units). A final **joint window** fixes the top of
the ranking: each window's best units, taken in turn by their rank inside their window, fill one
window that is scored as a whole; they rank by that score, above every other unit, and the others
follow in their windowed order (``joint_candidates``, ``joint_ranking``). Per-head scores (head
detection) keep the windowed means.

A unit bigger than a window (a tool output, a pasted file) is scored in window-sized pieces, at
most ``max_unit_pieces`` spread over it (``piece_starts``), and takes its best piece's score; in
the joint window its best 256-token stretch stands in for it, as that stretch is what it scores by.

Bounded cost: the query the heads read is capped at ``max_query_tokens`` (its first and last
halves: a question before pasted data, or after it), so the template and the query take at most
half a window and a window never runs past the model's positions. A pasted 40 k-character "query"
otherwise left a 64-token context budget, thousands of windows and a float32 row-attention
matrix of gigabytes per head.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ccproxy.compression.policy import KeepHint

INTRO = "Here are some paragraphs:"
LATE_INSTRUCTION = "Please find information that are relevant to the following query in the paragraphs above."
SEPARATOR = "\n\n"
NULL_QUERY = "N/A"
MAX_QUERY_TOKENS = 512
MIN_QUERY_TOKENS = 16
# A unit scores its best stretch of this many tokens (``unit_scores``): about the encoder's own
# window (254 tokens a piece), and above the length of an NQ passage (~135), whose sum it keeps.
UNIT_WINDOW_TOKENS = 256
# Padded tokens per batched forward (prompts x the longest) on CUDA: bounds a batch's activations;
# five full windows fit, or thirty 1 k-token requests. On a CPU the default is 0, every prompt
# alone: two cores are saturated by one 1 k-token prompt, and a padded batch of 8 took 1.2x the
# time of its prompts one by one (bench/scorer_batch.py: larger activations fall out of cache).
MAX_BATCH_TOKENS_CUDA = 32_768
# A unit bigger than a window is scored in at most this many window-sized pieces, spread evenly
# over it, and scores its best piece. On CUDA four (a 50 k-token tool output would need nine to be
# read whole); on a CPU one, its start: with two, a 50 k-token unit among 19 documents took 44 s on
# two cores (bench/scorer_cost.py), over the Gateway's 30 s Compressor timeout.
MAX_UNIT_PIECES_CUDA = 4
_SENTINEL = "\x00CCPROXY_CONTENT\x00"

Head = tuple[int, int]


# --- prompt layout ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """Token ids of one scoring prompt: ``context`` (template head, units, separators) then a tail.

    ``spans[k]`` is unit k's half-open token range inside ``context``.
    """

    context: list[int]
    spans: list[tuple[int, int]]
    query_tail: list[int]
    null_tail: list[int]


@dataclass(frozen=True)
class PromptPieces:
    """The fixed parts of every prompt for one tokenizer, tokenised once."""

    head: list[int]  # chat template up to the user content, then the intro and a separator
    separator: list[int]
    tail_prefix: list[int]  # late instruction, separator, "Query:"
    tail_suffix: list[int]  # end of the user turn and the assistant header

    def tail(self, query_ids: list[int]) -> list[int]:
        return self.tail_prefix + query_ids + self.tail_suffix

    def assemble(self, unit_ids: Sequence[list[int]], query_ids: list[int], null_ids: list[int]) -> Prompt:
        context = list(self.head)
        spans = []
        for ids in unit_ids:
            spans.append((len(context), len(context) + len(ids)))
            context += ids
            context += self.separator
        return Prompt(context, spans, self.tail(query_ids), self.tail(null_ids))


def prompt_pieces(tokenizer: Any, instruction: str = LATE_INSTRUCTION) -> PromptPieces:
    """Split the model's own chat template around the user content, so any template works."""

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
        )
        template_head, template_tail = rendered.split(_SENTINEL)
    else:
        template_head, template_tail = "", "\n"
    head = encode(template_head)
    bos = getattr(tokenizer, "bos_token_id", None)
    # Tokenizers that add a BOS by themselves expect it; a template that writes it already has it.
    if bos is not None and tokenizer("x").input_ids[:1] == [bos] and head[:1] != [bos]:
        head = [bos] + head
    separator = encode(SEPARATOR)
    return PromptPieces(
        head=head + encode(INTRO) + separator,
        separator=separator,
        tail_prefix=encode(instruction) + separator + encode("Query:"),
        tail_suffix=encode(template_tail),
    )


# --- the maths (pure functions) -----------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., heads, n, d]; cos/sin: [..., 1, n, d] or [n, d] (the model's rotary table at x's
    positions)."""
    return x * cos + rotate_half(x) * sin


def tail_mask(n_context: int, tail_lengths: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [n_tail, n_context + n_tail] (True = may attend) for tails run side by side: every
    tail sees the whole context and, causally, itself; never another tail."""
    n_tail = sum(tail_lengths)
    mask = torch.zeros(n_tail, n_context + n_tail, dtype=torch.bool, device=device)
    mask[:, :n_context] = True
    start = 0
    for length in tail_lengths:
        block = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        mask[start : start + length, n_context + start : n_context + start + length] = block
        start += length
    return mask


def batch_tail_mask(n_contexts: Sequence[int], tails: Sequence[Sequence[int]], context_width: int,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [batch, tail_width, context_width + tail_width] for the tails of padded prompts
    (contexts right-padded to ``context_width``, tails to the longest tail): each prompt's rows as
    ``tail_mask`` over its own context and tails, never a pad; a pad row sees key 0 only, so no
    softmax row is empty (nothing reads a pad row)."""
    tail_width = max(sum(lengths) for lengths in tails)
    mask = torch.zeros(len(tails), tail_width, context_width + tail_width, dtype=torch.bool, device=device)
    for b, (n_context, lengths) in enumerate(zip(n_contexts, tails, strict=True)):
        n_tail = sum(lengths)
        own = tail_mask(n_context, lengths, device)
        mask[b, :n_tail, :n_context] = own[:, :n_context]
        mask[b, :n_tail, context_width : context_width + n_tail] = own[:, n_context:]
        mask[b, n_tail:, 0] = True
    return mask


def padded_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of prompts grouped for padded forwards: longest first, so each group pads to its
    first member; a group grows while its padded size (members x first length) stays within
    ``max_tokens``. A prompt longer than that goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def rows_attention(
    queries: torch.Tensor, keys: torch.Tensor, kv_index: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Softmax rows for a few query rows, recomputed outside the model.

    queries: [heads, rows, d] post-RoPE; keys: [kv_heads, n_keys, d] post-RoPE; kv_index: [heads],
    the KV group each query head reads (GQA); mask: [rows, n_keys] booleans. -> [heads, rows, n_keys]
    """
    logits = torch.matmul(queries.float(), keys[kv_index].float().transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def calibrated_token_scores(probs: torch.Tensor, n_context: int, n_query_rows: int) -> torch.Tensor:
    """[heads, rows, n_keys] (query rows first, then the "N/A" rows) -> [heads, n_context]:
    mean attention of the query rows on each context token minus that of the "N/A" rows."""
    query = probs[:, :n_query_rows, :n_context].mean(dim=1)
    null = probs[:, n_query_rows:, :n_context].mean(dim=1)
    return query - null


def unit_scores(token_scores: torch.Tensor, spans: Sequence[tuple[int, int]],
                window: int | None = UNIT_WINDOW_TOKENS) -> torch.Tensor:
    """[..., n_tokens] -> [..., n_units]: per unit, its token scores above mean - 2 std (unbiased
    std, as the reference), summed over its best ``window`` consecutive tokens (prefix sums).

    A unit of at most ``window`` tokens scores the reference's sum (it ranks equal-length
    passages). Longer units score their best stretch: chat units run from five-token turns to
    whole code blocks and tool outputs, and a plain sum lets a long block outscore a short
    relevant turn by piling up many slightly positive tokens (bench/length_fair.py). The encoder
    scores a long unit by its best piece the same way (``DenseEncoder.scores``). ``None``: the
    plain sum. Units of 0 or 1 token keep what they have."""
    out = token_scores.new_zeros((*token_scores.shape[:-1], len(spans)))
    for k, (start, end) in enumerate(spans):
        scores = _without_outliers(token_scores[..., start:end])
        if window is None or end - start <= window:
            out[..., k] = scores.sum(dim=-1)
        else:
            out[..., k] = _stretch_sums(scores, window).max(dim=-1).values
    return out


def best_stretch(token_scores: torch.Tensor, span: tuple[int, int], window: int = UNIT_WINDOW_TOKENS) -> int:
    """[n_tokens] -> where, inside the unit at ``span``, the stretch that ``unit_scores`` scores it
    by starts (0 for a unit of at most ``window`` tokens)."""
    start, end = span
    if end - start <= window:
        return 0
    return int(_stretch_sums(_without_outliers(token_scores[start:end]), window).argmax())


def _without_outliers(scores: torch.Tensor) -> torch.Tensor:
    """A unit's token scores with those below mean - 2 std zeroed (1 token: as it is)."""
    if scores.shape[-1] < 2:
        return scores
    threshold = scores.mean(dim=-1, keepdim=True) - 2 * scores.std(dim=-1, keepdim=True)
    return scores * (scores > threshold)


def _stretch_sums(scores: torch.Tensor, window: int) -> torch.Tensor:
    """[..., n] -> [..., n - window + 1]: the sum of each ``window`` consecutive scores."""
    prefix = torch.nn.functional.pad(scores.cumsum(dim=-1), (1, 0))
    return prefix[..., window:] - prefix[..., :-window]


def combined_heads(token_scores: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """[n_heads, n_tokens] -> [1, n_tokens]: the heads' token scores summed, each times its weight
    (``weights`` [n_heads], rows' order; None: the reference's plain sum)."""
    if weights is not None:
        token_scores = token_scores * weights.to(token_scores.dtype)[:, None]
    return token_scores.sum(dim=0, keepdim=True)


def plan_windows(costs: Sequence[int], budget: int, overlap: int) -> list[range]:
    """Greedy windows of consecutive units whose costs fit ``budget``; each next window starts
    early enough to repeat up to ``overlap`` tokens of units from the end of the previous one.
    A unit bigger than the budget gets a window to itself (the caller scores it in pieces)."""
    windows: list[range] = []
    start, n = 0, len(costs)
    while start < n:
        end, total = start, 0
        while end < n and (end == start or total + costs[end] <= budget):
            total += costs[end]
            end += 1
        windows.append(range(start, end))
        if end == n:
            break
        next_start, repeated = end, 0
        while next_start - 1 > start and repeated + costs[next_start - 1] <= overlap:
            repeated += costs[next_start - 1]
            next_start -= 1
        start = next_start
    return windows


def piece_starts(n_tokens: int, piece: int, max_pieces: int) -> list[int]:
    """Where the pieces of a unit of ``n_tokens`` start, ``piece`` tokens each: as few as cover it,
    at most ``max_pieces``, the first at its start, the last at its end, the rest evenly between."""
    if n_tokens <= piece:
        return [0]
    count = min(max_pieces, -(-n_tokens // piece))
    if count == 1:
        return [0]
    last = n_tokens - piece
    return [round(i * last / (count - 1)) for i in range(count)]


def capped_query(query_ids: list[int], max_tokens: int) -> list[int]:
    """The query's first and last ``max_tokens // 2`` tokens (about) when it is longer."""
    if len(query_ids) <= max_tokens:
        return query_ids
    head = max_tokens // 2
    return query_ids[:head] + query_ids[len(query_ids) - (max_tokens - head):]


def joint_candidates(local: Sequence[tuple[Sequence[int], Sequence[float]]], costs: Sequence[int], budget: int) -> list[int]:
    """Units for the joint window, in document order: each window's best by its own score, taken
    in turn (every window's first, then every window's second, ...) while they fit ``budget``.
    ``local``: per window, its unit indices and their scores in that window. A unit in several
    windows is taken once; one that does not fit what is left is passed over."""
    orders = [[unit for _, unit in sorted(zip(scores, units), key=lambda pair: -pair[0])] for units, scores in local]
    chosen: set[int] = set()
    left = budget
    for rank in range(max((len(order) for order in orders), default=0)):
        for order in orders:
            if rank < len(order) and order[rank] not in chosen and costs[order[rank]] <= left:
                chosen.add(order[rank])
                left -= costs[order[rank]]
    return sorted(chosen)


def joint_ranking(windowed: Sequence[float], candidates: Sequence[int], joint: Sequence[float]) -> list[float]:
    """One score per unit: the joint window's for the candidates; the others below the lowest of
    those, in their windowed order, within one spread of the joint scores (ties stay ties)."""
    out = [float(x) for x in windowed]
    for k, value in zip(candidates, joint, strict=True):
        out[k] = float(value)
    rest = sorted(set(range(len(windowed))) - set(candidates), key=lambda k: -windowed[k])
    if not rest or not candidates:
        return out
    low = min(joint)
    spread = (max(joint) - low) or abs(low) or 1.0
    step = spread / (len(rest) + 1)
    rank = 0
    for position, k in enumerate(rest):
        if position and windowed[k] != windowed[rest[position - 1]]:
            rank = position
        out[k] = low - step * (rank + 1)
    return out


def middle_layers(n_layers: int) -> range:
    """The middle third of the layers: ICR-style scoring without detected heads."""
    return range(n_layers // 3, max(n_layers // 3 + 1, (2 * n_layers) // 3))


# --- running the model --------------------------------------------------------------------------


class _KeyValueStore:
    """The smallest KV cache the decoder layers accept: they only call ``update``. Owning it keeps
    the scorer independent of the cache classes, which change between transformers versions."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if layer_idx in self.keys:
            keys = torch.cat([self.keys[layer_idx], keys], dim=-2)
            values = torch.cat([self.values[layer_idx], values], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if layer_idx not in self.keys else self.keys[layer_idx].shape[-2]


def decoder_of(model: Any) -> Any:
    """The decoder stack (embed_tokens, layers, rotary_emb) of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model if hasattr(base, "model") and hasattr(base.model, "layers") else base


def _run_layer(layer: Any, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor], store: _KeyValueStore) -> torch.Tensor:
    # Positional (hidden, mask, position_ids, cache): the 4th parameter is the cache under both
    # the transformers 4.x (``past_key_value``) and 5.x (``cache``) signatures.
    out = layer(hidden, mask, positions, store, use_cache=True, position_embeddings=rope)
    return out[0] if isinstance(out, tuple) else out


def _project(layer: Any, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], which: str) -> torch.Tensor:
    """Post-RoPE query or key vectors of one layer for hidden rows [batch, n, dim]: [batch, heads, n, d]."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    proj = attn.q_proj if which == "q" else attn.k_proj
    states = proj(x).view(x.shape[0], x.shape[1], -1, attn.head_dim)
    norm = getattr(attn, "q_norm" if which == "q" else "k_norm", None)  # Qwen3-style QK-norm
    if norm is not None:
        states = norm(states)
    cos, sin = rope
    return apply_rope(states.transpose(1, 2), cos[:, None], sin[:, None])


def window_token_scores(decoder: Any, prompt: Prompt, heads_by_layer: Mapping[int, Sequence[int]],
                        group: int) -> torch.Tensor:
    """Calibrated scores of every context token for the selected heads of one window:
    [n_selected_heads, len(prompt.context)], rows ordered by layer, then head as given.

    Grad-agnostic: the scorer calls it under ``torch.inference_mode()``; the LoRA fine-tune
    (``training/train_qr_lora.py``) calls it with autograd on, so training optimises exactly the
    numbers the Compressor serves. ``group``: query heads per KV head (GQA).
    """
    return batch_token_scores(decoder, [prompt], heads_by_layer, group)[0]


def batch_token_scores(decoder: Any, prompts: Sequence[Prompt], heads_by_layer: Mapping[int, Sequence[int]],
                       group: int) -> list[torch.Tensor]:
    """``window_token_scores`` of several prompts in padded forwards: one context pass and one
    tail pass for all of them (a batch costs one dispatch of each layer, not one per prompt)."""
    layers = decoder.layers
    deepest = max(heads_by_layer)
    device = decoder.embed_tokens.weight.device
    n_contexts = [len(prompt.context) for prompt in prompts]
    tails = [(len(prompt.query_tail), len(prompt.null_tail)) for prompt in prompts]
    width = max(n_contexts)
    store = _KeyValueStore()

    # Contexts, right-padded: under the causal mask no real token attends to a later pad, so the
    # pass needs no padding mask. SDPA applies the causal mask itself when given none (checked in
    # tests/scorer/test_qrhead_batch.py against an explicit mask).
    context_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        context_ids[b, : n_contexts[b]] = torch.tensor(prompt.context, dtype=torch.long)
    positions = torch.arange(width, device=device)[None].expand(len(prompts), -1)
    hidden = decoder.embed_tokens(context_ids.to(device))
    rope = decoder.rotary_emb(hidden, positions)
    for index in range(deepest):
        hidden = _run_layer(layers[index], hidden, None, positions, rope, store)
    deepest_context_keys = _project(layers[deepest], hidden, rope, "k")
    del hidden

    # Both tails of each prompt in one sequence, each starting right after its own context.
    tail_width = max(q + n for q, n in tails)
    tail_ids = torch.zeros(len(prompts), tail_width, dtype=torch.long)
    positions = torch.zeros(len(prompts), tail_width, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        (n_query, n_null), n_context = tails[b], n_contexts[b]
        tail_ids[b, : n_query + n_null] = torch.tensor(prompt.query_tail + prompt.null_tail, dtype=torch.long)
        positions[b] = n_context
        positions[b, : n_query + n_null] = torch.cat([torch.arange(n_query), torch.arange(n_null)]) + n_context
    positions = positions.to(device)
    mask = batch_tail_mask(n_contexts, tails, width, device)
    hidden = decoder.embed_tokens(tail_ids.to(device))
    rope = decoder.rotary_emb(hidden, positions)
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    for index in range(deepest + 1):
        layer = layers[index]
        wanted = heads_by_layer.get(index)
        queries = _project(layer, hidden, rope, "q") if wanted else None
        if index < deepest:
            hidden = _run_layer(layer, hidden, mask[:, None], positions, rope, store)
            keys = store.keys[index]
        else:
            keys = torch.cat([deepest_context_keys, _project(layer, hidden, rope, "k")], dim=2)
        if wanted:
            head_index = torch.tensor(list(wanted), device=device)
            scaling = float(getattr(layer.self_attn, "scaling", 1 / math.sqrt(queries.shape[-1])))
            for b, ((n_query, n_null), n_context) in enumerate(zip(tails, n_contexts)):
                n_tail = n_query + n_null
                own_keys = torch.cat([keys[b, :, :n_context], keys[b, :, width : width + n_tail]], dim=1)
                probs = rows_attention(queries[b, head_index, :n_tail], own_keys, head_index // group,
                                       tail_mask(n_context, [n_query, n_null], device), scaling)
                rows[b].append(calibrated_token_scores(probs, n_context, n_query).cpu())
    return [torch.cat(prompt_rows, dim=0) for prompt_rows in rows]


# --- the scorer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    windowed: list[float]  # per unit, the mean of its scores in the windows that hold it
    ranked: list[float]  # what ``score`` returns: the joint window's ranking over several windows
    windows: int  # window prompts scored (an oversized unit's pieces included), joint window apart


class QRHeadScorer:
    """Scores context units by the calibrated attention of selected heads from the query.

    ``heads``: (layer, head) pairs; ``None`` scores with every head of the middle third of the
    layers (ICR-style, no detection needed). ``head_weights``: one non-negative weight per head,
    in the order of ``heads`` (``training/fit_head_weights.py``); None: every head counts 1. Heads
    of weight 0 are left out of ``self.heads`` (never computed).
    ``window_tokens``: the longest prompt scored at once; longer contexts go through overlapping windows (``overlap_tokens`` of units repeated); a unit
    bigger than a window, through up to ``max_unit_pieces`` window-sized pieces (its best counts;
    None: MAX_UNIT_PIECES_CUDA on CUDA, 1 on a CPU).
    ``max_batch_tokens``: padded tokens per batched forward (None: MAX_BATCH_TOKENS_CUDA on CUDA,
    0 on a CPU, where each prompt runs alone).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        heads: Sequence[tuple[int, int]] | None = None,
        *,
        head_weights: Sequence[float] | None = None,
        window_tokens: int = 6000,
        overlap_tokens: int = 512,
        instruction: str = LATE_INSTRUCTION,
        null_query: str = NULL_QUERY,
        max_query_tokens: int = MAX_QUERY_TOKENS,
        max_batch_tokens: int | None = None,
        max_unit_pieces: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.decoder = decoder_of(model)
        config = self.decoder.config if hasattr(self.decoder, "config") else model.config
        self.n_layers = int(config.num_hidden_layers)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.kv_group = self.n_heads // self.n_kv_heads  # query heads per KV head (GQA)
        if heads is None:
            heads = [(layer, head) for layer in middle_layers(self.n_layers) for head in range(self.n_heads)]
        pairs = [(int(layer), int(head)) for layer, head in heads]
        self.heads: list[Head] = sorted(set(pairs))
        self.head_weights: torch.Tensor | None = None
        if head_weights is not None:
            if len(head_weights) != len(pairs) or len(self.heads) != len(pairs):
                raise ValueError(f"{len(head_weights)} weights for {len(pairs)} heads ({len(self.heads)} distinct)")
            weight_of = dict(zip(pairs, (float(w) for w in head_weights)))
            if not all(w >= 0 and math.isfinite(w) for w in weight_of.values()):
                raise ValueError("head weights must be finite and non-negative")
            # A head of weight 0 adds nothing to any score: it is not computed at all.
            self.heads = [h for h in self.heads if weight_of[h] > 0]
            if not self.heads:
                raise ValueError("every head weight is 0")
            self.head_weights = torch.tensor([weight_of[h] for h in self.heads])  # rows' order
        for layer, head in self.heads:
            if not (0 <= layer < self.n_layers and 0 <= head < self.n_heads):
                raise ValueError(f"head ({layer}, {head}) is outside {self.n_layers} layers x {self.n_heads} heads")
        if not self.heads:
            raise ValueError("the head set is empty")
        # Windows compute full causal attention: keep them within the positions the model was
        # trained on and within a sliding window, where the model has one.
        limits = [getattr(config, "sliding_window", None), getattr(config, "max_position_embeddings", None)]
        self.window_tokens = min([window_tokens, *(int(x) for x in limits if x)])
        self.overlap_tokens = overlap_tokens
        on_cuda = self.decoder.embed_tokens.weight.device.type == "cuda"
        if max_unit_pieces is None:
            max_unit_pieces = MAX_UNIT_PIECES_CUDA if on_cuda else 1
        if max_unit_pieces < 1:
            raise ValueError(f"max_unit_pieces must be >= 1, got {max_unit_pieces}")
        self.max_unit_pieces = max_unit_pieces
        if max_batch_tokens is None:
            max_batch_tokens = MAX_BATCH_TOKENS_CUDA if on_cuda else 0
        self.max_batch_tokens = max_batch_tokens
        self.null_query = null_query
        self.pieces = prompt_pieces(tokenizer, instruction)
        self._null_ids = self._encode(f" {null_query}")
        # The template and the query take at most half a window (a small window caps the query
        # lower), so every window has at least half its tokens for the context.
        template = len(self.pieces.head) + len(self.pieces.tail([]))
        self.max_query_tokens = min(max_query_tokens, self.window_tokens // 2 - template)
        if self.max_query_tokens < MIN_QUERY_TOKENS:
            raise ValueError(f"a window of {self.window_tokens} tokens leaves no room for a query: raise window_tokens")

    @classmethod
    def load(cls, source: str | None = None, *, adapter: str | None = None, **kwargs: Any) -> QRHeadScorer:
        """The scoring model (see ``model.load_scoring_model``) with its shipped head set, if any."""
        from ccproxy.compression.heads import head_pairs, head_weights, scoring_head_file
        from ccproxy.compression.model import load_scoring_model

        model, tokenizer, name = load_scoring_model(source, adapter=adapter)
        if "heads" not in kwargs:
            data = scoring_head_file(name, adapter)
            kwargs["heads"] = None if data is None else head_pairs(data)
            kwargs.setdefault("head_weights", head_weights(data))
        return cls(model, tokenizer, **kwargs)

    # -- public API --------------------------------------------------------------------------

    def score(self, query: str, units: Sequence[str], hint: KeepHint | None = None) -> list[float]:
        """One relevance score per unit (higher = more relevant to the query). ``hint`` is read by
        the callers (a pass whose scores cannot change the kept set is not made), not here."""
        return self.scored(query, units).ranked

    def scored(self, query: str, units: Sequence[str]) -> Scored:
        """``score`` with the windowed means beside it (the benchmark compares the two)."""
        return self.scored_batch([(query, units)])[0]

    def score_batch(self, requests: Sequence[tuple[Any, ...]]) -> list[list[float]]:
        """Scores for many (query, units) or (query, units, hint) requests: the windows of all of
        them go through the model together, in padded forwards (``batch_token_scores``)."""
        return [scored.ranked for scored in self.scored_batch([(request[0], request[1]) for request in requests])]

    def scored_batch(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[Scored]:
        """``scored`` for several requests at once."""
        return self._windowed_many(requests, self._group(self.heads), per_head=False)

    def per_head_unit_scores(self, query: str, units: Sequence[str], layers: Sequence[int] | None = None) -> torch.Tensor:
        """[len(layers), n_heads, n_units]: each head's own unit scores (threshold per head), for
        head detection. ``layers`` defaults to all layers; given, they must be ascending and
        distinct, the order the rows come out of the model in."""
        layers = list(range(self.n_layers)) if layers is None else list(layers)
        if layers != sorted(set(layers)):
            raise ValueError(f"layers must be ascending and distinct, got {layers}: rows would be mislabelled")
        heads_by_layer = {layer: list(range(self.n_heads)) for layer in layers}
        if not units:
            return torch.zeros(len(layers), self.n_heads, 0)
        [per_head] = self._windowed_many([(query, units)], heads_by_layer, per_head=True)  # [n_sel, n_units]
        return per_head.view(len(layers), self.n_heads, len(units))

    def build_prompt(self, query: str, units: Sequence[str]) -> Prompt:
        """The single-window prompt for ``units`` (no truncation)."""
        return self.pieces.assemble(self._encode_units(units), self._query_ids(query), self._null_ids)

    def token_scores(self, prompt: Prompt, heads_by_layer: Mapping[int, Sequence[int]]) -> torch.Tensor:
        """Calibrated per-head scores of every context token: [n_selected_heads, len(context)],
        rows ordered by layer, then head as given."""
        [tokens] = self._batch_token_scores([prompt], heads_by_layer)
        return tokens

    def differentiable_unit_scores(self, query: str, units: Sequence[str]) -> torch.Tensor:
        """[n_units] scores of one single-window prompt with autograd on, for the LoRA fine-tune:
        the same functions as ``score`` (heads summed, then each unit thresholded), minus the
        inference mode. A prompt longer than ``window_tokens`` is refused, not windowed."""
        prompt = self.build_prompt(query, units)
        if len(prompt.context) + len(prompt.query_tail) > self.window_tokens:
            raise ValueError(f"the prompt does not fit one window of {self.window_tokens} tokens")
        tokens = window_token_scores(self.decoder, prompt, self._group(self.heads), self.kv_group)
        return unit_scores(combined_heads(tokens, self.head_weights)[0], prompt.spans)

    # -- internals ---------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _query_ids(self, query: str) -> list[int]:
        # Tokenised whole (linear in its length), then capped.
        return capped_query(self._encode(f" {query}"), self.max_query_tokens)

    def _encode_units(self, units: Sequence[str]) -> list[list[int]]:
        texts = [u for u in units if u]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False).input_ids if texts else [])
        return [list(next(encoded)) if u else [] for u in units]

    @staticmethod
    def _group(heads: Sequence[Head]) -> dict[int, list[int]]:
        grouped: dict[int, list[int]] = {}
        for layer, head in heads:
            grouped.setdefault(layer, []).append(head)
        return dict(sorted(grouped.items()))

    def _plan(self, query: str, units: Sequence[str]) -> _Plan:
        unit_ids = self._encode_units(units)
        query_ids = self._query_ids(query)
        fixed = len(self.pieces.head) + len(self.pieces.tail(query_ids))
        budget = self.window_tokens - fixed  # at least half a window (the query is capped)
        costs = [len(ids) + len(self.pieces.separator) for ids in unit_ids]
        windows = plan_windows(costs, budget, self.overlap_tokens)
        return _Plan(unit_ids, query_ids, costs, budget, windows, len(self.pieces.separator))

    def _window_prompt(self, plan: _Plan, chosen: Sequence[int], piece_start: int = 0,
                       stand_ins: Mapping[int, int] | None = None) -> Prompt:
        """The ``chosen`` units of one request as one window's prompt. An oversized unit (alone in
        its window) is its window-sized piece from ``piece_start``; in the joint window
        (``stand_ins``: unit -> where its best stretch starts), its best stretch."""
        ids = []
        for k in chosen:
            unit = plan.unit_ids[k]
            if plan.oversized(k):
                start, length = (stand_ins[k], UNIT_WINDOW_TOKENS) if stand_ins is not None else (piece_start, plan.piece_tokens)
                unit = unit[start : start + length]
            ids.append(unit)
        return self.pieces.assemble(ids, plan.query_ids, self._null_ids)

    def _jobs(self, plans: Sequence[_Plan]) -> list[tuple[int, list[int], int]]:
        """(request, its window's units, piece start) for every prompt to score: one per window,
        and one per piece for a unit bigger than a window (``piece_starts``)."""
        jobs = []
        for r, plan in enumerate(plans):
            for window in plan.windows:
                if len(window) == 1 and plan.oversized(window[0]):
                    n_tokens = len(plan.unit_ids[window[0]])
                    jobs += [(r, [window[0]], start) for start in piece_starts(n_tokens, plan.piece_tokens, self.max_unit_pieces)]
                else:
                    jobs.append((r, list(window), 0))
        return jobs

    def _windowed_many(self, requests: Sequence[tuple[str, Sequence[str]]],
                       heads_by_layer: Mapping[int, Sequence[int]], *, per_head: bool) -> list[Any]:
        """Per request, the [n_rows, n_units] tensor (``per_head``) or its ``Scored``: every window
        of every request in one batched pass, then the joint windows of the requests that had
        several windows in a second. A unit in several windows scores the mean of its windows'
        scores; an oversized unit, its best piece's, and its best stretch stands in for it in the
        joint window."""
        plans = [self._plan(query, units) for query, units in requests]
        jobs = self._jobs(plans)
        n_rows = sum(len(h) for h in heads_by_layer.values()) if per_head else 1
        totals = [torch.zeros(n_rows, len(plan.unit_ids), dtype=torch.float64) for plan in plans]
        counts = [torch.zeros(len(plan.unit_ids), dtype=torch.float64) for plan in plans]
        best_piece: dict[tuple[int, int], torch.Tensor] = {}  # (request, unit) -> [n_rows], rowwise max
        stand_ins: list[dict[int, int]] = [{} for _ in plans]  # per request: unit -> its best stretch's start
        local: list[list[tuple[list[int], list[float]]]] = [[] for _ in plans]
        window_scores, stretches = self._unit_scores_many(
            [self._window_prompt(plans[r], chosen, start) for r, chosen, start in jobs], heads_by_layer, per_head)
        for (r, chosen, start), scores, stretch in zip(jobs, window_scores, stretches, strict=True):
            if len(chosen) == 1 and plans[r].oversized(chosen[0]):
                key, piece = (r, chosen[0]), scores[:, 0].double()
                seen = best_piece.get(key)
                if seen is None or piece[0] > seen[0]:
                    stand_ins[r][chosen[0]] = start + stretch
                best_piece[key] = piece if seen is None else torch.maximum(seen, piece)
                continue
            totals[r][:, chosen[0] : chosen[-1] + 1] += scores.double()
            counts[r][chosen[0] : chosen[-1] + 1] += 1
            local[r].append((chosen, scores[0].tolist()))
        for (r, k), scores in best_piece.items():
            totals[r][:, k], counts[r][k] = scores, 1
            local[r].append(([k], [float(scores[0])]))
        means = [(total / count.clamp(min=1)).float() for total, count in zip(totals, counts)]
        prompts_per_request = [0] * len(plans)
        for r, _, _ in jobs:
            prompts_per_request[r] += 1
        if per_head:
            return means
        windowed = [mean[0].tolist() for mean in means]
        several = [r for r, plan in enumerate(plans) if len(plan.windows) > 1]
        candidates = {r: joint_candidates(local[r], plans[r].joint_costs, plans[r].budget) for r in several}
        joint, _ = self._unit_scores_many(
            [self._window_prompt(plans[r], candidates[r], stand_ins=stand_ins[r]) for r in several], heads_by_layer, False)
        ranked = {r: joint_ranking(windowed[r], candidates[r], scores[0].tolist()) for r, scores in zip(several, joint)}
        return [Scored(windowed[r], ranked.get(r, windowed[r]), prompts_per_request[r]) for r in range(len(plans))]

    def _unit_scores_many(self, prompts: Sequence[Prompt], heads_by_layer: Mapping[int, Sequence[int]],
                          per_head: bool) -> tuple[list[torch.Tensor], list[int]]:
        """Per prompt, the scores of its units, [n_rows or 1, n_units], and for a prompt of one
        unit where that unit's best stretch starts (``best_stretch`` of the heads' sum; else 0)."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
        stretches = [0] * len(prompts)
        lengths = [len(prompt.context) + len(prompt.query_tail) + len(prompt.null_tail) for prompt in prompts]
        for members in padded_batches(lengths, self.max_batch_tokens):
            batch = [prompts[i] for i in members]
            for i, tokens in zip(members, self._batch_token_scores(batch, heads_by_layer), strict=True):
                if per_head:
                    out[i] = unit_scores(tokens, prompts[i].spans)
                    continue
                combined = combined_heads(tokens, self.head_weights)  # only ever with this scorer's own heads
                out[i] = unit_scores(combined, prompts[i].spans)
                if len(prompts[i].spans) == 1:
                    stretches[i] = best_stretch(combined[0], prompts[i].spans[0])
        return out, stretches

    @torch.inference_mode()
    def _batch_token_scores(self, prompts: Sequence[Prompt], heads_by_layer: Mapping[int, Sequence[int]]) -> list[torch.Tensor]:
        # The serving path: no autograd bookkeeping (inference mode is cheaper than no_grad).
        return batch_token_scores(self.decoder, prompts, heads_by_layer, self.kv_group)


@dataclass(frozen=True)
class _Plan:
    """One request tokenised and cut into windows."""

    unit_ids: list[list[int]]
    query_ids: list[int]
    costs: list[int]  # each unit's tokens with its separator
    budget: int  # context tokens a window holds
    windows: list[range]
    separator_tokens: int

    @property
    def piece_tokens(self) -> int:
        """Tokens of an oversized unit one window holds (its separator aside)."""
        return self.budget - self.separator_tokens

    def oversized(self, unit: int) -> bool:
        return self.costs[unit] > self.budget

    @property
    def joint_costs(self) -> list[int]:
        """Each unit's cost in the joint window, where an oversized unit is its best stretch."""
        stand_in = UNIT_WINDOW_TOKENS + self.separator_tokens
        return [min(cost, stand_in) if cost > self.budget else cost for cost in self.costs]
