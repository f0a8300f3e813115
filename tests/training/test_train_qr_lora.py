"""A few LoRA steps on a tiny training-part slice: the loss falls, a resumed run continues where
the checkpoint left off, and the Compressor loads the adapter with the heads (and head weights) it
was trained for. The loss and the LoRA placement are pure functions, tested on their own."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ccproxy.compression.heads import head_pairs, head_weights, load_head_set, read_head_set
from ccproxy.compression.model import EMBEDDED_HUB_ID, EMBEDDED_NAME, load_scoring_model
from ccproxy.compression.qrhead import QRHeadScorer
from ccproxy.compression.scoring import load_scorer
from ccproxy.settings import Settings
from nqdata.items import load_records, random_distractor_items
from training.data import UnitsItem, split_items
from training.train_qr_lora import (
    CHECKPOINT,
    METADATA,
    TrainConfig,
    answering_units,
    batch_indices,
    learning_rate,
    listwise_loss,
    lora_target_modules,
    step_examples,
    train,
)

# The weighted set fitted on hard distractors: shallower than the base model's set (cheaper steps)
# and not equal to it, so the test can tell whether the Compressor scores with the adapter's heads
# (and their weights) or the base set's.
HEAD_SET = "smollm2-135m-instruct-hard"


@pytest.fixture(scope="module")
def tiny() -> tuple[list, list]:
    records = load_records("train")[:30]
    items = random_distractor_items(records[:20], 4, n_items=3, seed=3)
    held_out = random_distractor_items(records[20:], 4, n_items=1, seed=3)
    return items, held_out


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> tuple[TrainConfig, list[dict]]:
    items, held_out = tiny
    out = tmp_path_factory.mktemp("qr-lora")
    # Every step sees the same three items, so the per-step loss is the loss of one fixed batch.
    config = TrainConfig(out=out, steps=5, batch_size=3, learning_rate=3e-3, warmup_steps=1,
                         rank=4, alpha=8, eval_every=100, checkpoint_every=5, head_set=HEAD_SET)
    first = train(config, items, held_out)
    assert first.step == 5 and (out / CHECKPOINT).is_dir()
    resumed = train(replace(config, steps=8, resume=True), items, held_out)
    assert resumed.step == 8
    # The resumed run continued from step 5 (it did not start over); no held-out check repeated.
    assert resumed.history[:5] == first.history
    assert [c["step"] for c in resumed.checks] == [0, 5, 8]
    return config, resumed.history


def trace_like(item) -> UnitsItem:
    """An NQ item read as a trace item (units, one gold), as bench/trace_items.py writes them."""
    return UnitsItem(item.question, tuple(item.document_texts()), item.gold_index, "research")


def test_trace_items_mix_into_every_step_from_the_given_adapter(trained, tiny, tmp_path) -> None:
    config, _ = trained
    items, held_out = tiny
    traces = [trace_like(item) for item in items]
    first_run = json.loads((config.out / METADATA).read_text())
    mixed = TrainConfig(out=tmp_path, steps=2, batch_size=2, learning_rate=3e-3, warmup_steps=1,
                        eval_every=100, checkpoint_every=100, init_adapter=str(config.out), traces_per_batch=1)
    state = train(mixed, items, held_out, traces=traces[:2], trace_held_out=[trace_like(held_out[0])])
    # Step 0 scores with the adapter it started from (the first run's last check), not a fresh
    # LoRA (the base model: the first run's step-0 check), and with that adapter's head set.
    start, end = state.checks[0], state.checks[-1]
    assert start["loss"] == pytest.approx(first_run["checks"][-1]["loss"], rel=1e-4)
    assert start["loss"] != pytest.approx(first_run["checks"][0]["loss"], rel=1e-4)
    # The held-out trace is the held-out NQ item read as units: the same list, the same measures.
    assert start["traces_loss"] == pytest.approx(start["loss"], rel=1e-4) and end["step"] == 2
    assert json.loads((tmp_path / "heads.json").read_text())["heads"] == json.loads((config.out / "heads.json").read_text())["heads"]
    metadata = json.loads((tmp_path / METADATA).read_text())
    assert len(metadata["nq_lines"]["train_seen"]) == 2  # one NQ item a step; the traces have no NQ line
    # The LoRA recorded is the one trained: the first run's rank 4, not this config's default 8.
    assert mixed.rank == 8 and metadata["config"]["lora"]["r"] == 4
    assert "which it started from" in json.loads((tmp_path / "heads.json").read_text())["source"]
    with pytest.raises(ValueError, match="traces_per_batch"):
        train(replace(mixed, traces_per_batch=2), items, held_out, traces=traces)


def test_each_step_takes_its_share_of_trace_items_in_their_own_order() -> None:
    config = TrainConfig(out=Path("."), batch_size=4, traces_per_batch=1, seed=3)
    nq = [f"nq{i}" for i in range(9)]
    traces = [f"t{i}" for i in range(5)]
    steps = [step_examples(step, config, nq, traces) for step in range(10)]
    assert all(len(batch) == 4 and batch[-1].startswith("t") and not any(e.startswith("t") for e in batch[:3]) for batch in steps)
    # Each source is seen evenly: every trace twice in ten steps, every NQ item within one epoch.
    assert sorted(batch[-1] for batch in steps) == sorted(traces * 2)
    assert sorted(e for batch in steps[:3] for e in batch[:3]) == sorted(nq)
    assert step_examples(7, config, nq, traces) == steps[7]
    assert step_examples(0, config, nq, []) == [nq[i] for i in batch_indices(0, 4, 9, 3)]  # no traces: all NQ


def test_trace_items_split_as_head_detection_splits_them() -> None:
    items = list(range(30))
    fit, held = split_items(items, 8, seed=0)
    assert len(held) == 8 and sorted(fit + held) == items and fit == sorted(fit) and held == sorted(held)
    assert split_items(items, 8, seed=0) == (fit, held) != split_items(items, 8, seed=1)
    assert answering_units(UnitsItem("q", ("a", "b", "c"), 2, "coding")) == [2]


def test_loss_decreases(trained) -> None:
    _, history = trained
    losses = [row["loss"] for row in history]
    # Step 1's loss is the base model's (LoRA starts as the identity); the last is after 7 updates.
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses


def test_the_compressor_loads_the_adapter_with_its_heads(trained, tiny) -> None:
    config, _ = trained
    metadata = json.loads((config.out / METADATA).read_text())
    assert metadata["steps_done"] == 8
    assert metadata["nq_lines"]["train_seen"] == sorted(item.record.line for item in tiny[0])
    assert all(line < 500 for part in metadata["nq_lines"].values() for line in part)
    # The adapter names its base, not this machine's model cache.
    for folder in (config.out, config.out / CHECKPOINT):
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_HUB_ID

    scorer = load_scorer(Settings(scoring_lora_path=config.out, scoring_mode="qrhead"))
    assert isinstance(scorer, QRHeadScorer)
    assert hasattr(scorer.model, "peft_config")  # peft-wrapped
    shipped = read_head_set(HEAD_SET)
    weight_of = dict(zip(head_pairs(shipped), head_weights(shipped)))
    # The set's heads but those of weight 0, which are never computed.
    assert 0 in weight_of.values()
    assert scorer.heads == sorted(h for h, w in weight_of.items() if w > 0) != sorted(load_head_set(EMBEDDED_NAME))
    assert scorer.head_weights.tolist() == pytest.approx([weight_of[h] for h in scorer.heads])
    # LoRA sits where it is read: every projection below the deepest head, q and k at it.
    deepest = max(layer for layer, _ in scorer.heads)
    adapted_modules = {name.split(".lora_A")[0] for name, _ in scorer.model.named_parameters() if "lora_A" in name}
    assert any(name.endswith(f"layers.{deepest}.self_attn.q_proj") for name in adapted_modules)
    assert not any(f"layers.{deepest}.self_attn.v_proj" in name for name in adapted_modules)
    assert not any(f"layers.{deepest + 1}." in name for name in adapted_modules)

    base = load_scoring_model()
    plain = QRHeadScorer(base.model, base.tokenizer, head_pairs(shipped), head_weights=head_weights(shipped))
    item = tiny[0][0]
    adapted = torch.tensor(scorer.score(item.question, item.document_texts()))
    original = torch.tensor(plain.score(item.question, item.document_texts()))
    assert not torch.allclose(adapted, original, rtol=1e-3, atol=1e-4)
    # The base model the other scorers share was not touched by training.
    assert not hasattr(base.model, "peft_config")


def test_schedule_and_order_are_functions_of_the_step() -> None:
    assert learning_rate(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert learning_rate(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert learning_rate(100, 100, 1.0, 10) == pytest.approx(0.1)
    # One epoch covers every item once; the next epoch is another permutation.
    epoch = [i for step in range(5) for i in batch_indices(step, 2, 10, seed=0)]
    assert sorted(epoch) == list(range(10))
    assert batch_indices(5, 2, 10, 0) + batch_indices(6, 2, 10, 0) != epoch[:4]
    assert batch_indices(3, 2, 10, 0) == batch_indices(3, 2, 10, 0)


def test_an_adapter_without_heads_json_scores_with_the_base_models_set(tmp_path) -> None:
    from ccproxy.compression.heads import ADAPTER_HEADS_FILE, scoring_head_set

    adapted = f"{EMBEDDED_NAME}+{tmp_path.name}"
    assert scoring_head_set(adapted, tmp_path) == load_head_set(EMBEDDED_NAME)
    (tmp_path / ADAPTER_HEADS_FILE).write_text(json.dumps({"heads": [[3, 1]]}))
    assert scoring_head_set(adapted, tmp_path) == [(3, 1)]
    # Without an adapter, the adapted name alone does not borrow the base set.
    assert scoring_head_set(adapted) is None


def test_the_listwise_loss_is_scale_free_and_counts_every_positive() -> None:
    scores = torch.tensor([0.02, 0.10, 0.01, 0.03])
    normalised = listwise_loss(scores, [1], 1.0, normalise=True)
    # z-scores: the same list at 100x the attention mass has the same loss; raw scores do not.
    assert float(listwise_loss(100 * scores, [1], 1.0, normalise=True)) == pytest.approx(float(normalised), rel=1e-5)
    assert float(listwise_loss(100 * scores, [1], 1.0, normalise=False)) < float(listwise_loss(scores, [1], 1.0, normalise=False))
    # One positive: plain cross-entropy.
    expected = torch.nn.functional.cross_entropy((scores / 0.05)[None], torch.tensor([1]))
    assert float(listwise_loss(scores, [1], 0.05, normalise=False)) == pytest.approx(float(expected), rel=1e-5)
    # Two positives: the mass on either counts, so the loss is lower than with one of them alone.
    assert float(listwise_loss(scores, [1, 3], 1.0, normalise=True)) < float(normalised)
    assert float(listwise_loss(scores, [1, 1], 1.0, normalise=True)) == pytest.approx(float(normalised))
    # A flat list does not divide by zero.
    assert torch.isfinite(listwise_loss(torch.zeros(4), [0], 1.0, normalise=True))
    with pytest.raises(ValueError):
        listwise_loss(scores, [], 1.0, normalise=True)


def test_lora_targets_every_projection_below_the_deepest_head_and_only_q_k_at_it() -> None:
    names = lora_target_modules(["q_proj", "k_proj", "v_proj", "o_proj"], deepest=2)
    assert names == [f"layers.{layer}.self_attn.{p}" for layer in (0, 1) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        "layers.2.self_attn.q_proj", "layers.2.self_attn.k_proj"]
    assert lora_target_modules(["v_proj"], deepest=1) == ["layers.0.self_attn.v_proj"]


def test_answering_units_are_the_gold_and_any_document_holding_an_answer() -> None:
    records = load_records("train")[:40]
    items = random_distractor_items(records, 6, n_items=40, seed=1)
    for item in items:
        units = answering_units(item)
        assert item.gold_index in units
        for i in set(range(len(item.documents))) - set(units):
            assert not any(answer.lower() in item.documents[i].text.lower() for answer in item.record.answers if len(answer) > 3)
