"""Whole traces (issue 23 §1): an answer as decoded, who chose each token, and whole-trace DPO pairs built from it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from reempathy.config import ComponentConfig, DecodeConfig, DecodeSettings, SamplingConfig
from reempathy.data.records import SourcedRecord
from reempathy.data.schema import DecodedTrace, Record
from reempathy.decoding.batch import RowRequest, decode_batch
from reempathy.errors import InputError
from reempathy.hooks import hookimpl
from reempathy.registry import default_discovery
from reempathy.runner import build_plugins, loop_options
from reempathy.training.builders import DpoBuild, build_dpo
from reempathy.training.collate import PreferenceCollator
from reempathy.training.trace import FORCED, HIDDEN, SPOKEN, Trace, TraceRecorder, trace_of

REEMPATHY = {"text_tokens": 3, "audio_tokens": 6, "max_reflection_tokens": 3}


class StopAt:
    """Makes the backbone's first stop token the only choice at the ``n``-th sampled token."""

    def __init__(self, backbone, n):
        self.stop, self.n = backbone.layout.stop_ids[0], n

    @hookimpl
    def reempathy_logits(self, session, logits):
        if session.generated + 1 == self.n:
            logits.fill_(float("-inf"))
            logits[self.stop] = 0.0


def decode_trace(tiny, tiny_prompt, strategy="reempathy", options=None, extra=(), max_new_tokens=40, seed=0):
    """One row of the batched decoder with a trace recorder beside its plugins: (result, trace)."""
    options = dict(REEMPATHY if options is None and strategy == "reempathy" else options or {})
    cfg = DecodeConfig(strategy=ComponentConfig(name=strategy, **options), sampling=SamplingConfig(seed=seed),
                       decode=DecodeSettings(max_new_tokens=max_new_tokens))
    plugin, processors = build_plugins(cfg, tiny, default_discovery().registry)
    recorder = TraceRecorder()
    request = RowRequest(0, tiny_prompt, plugin, [*processors, *extra, recorder], seed=seed)
    [(_, result)] = list(decode_batch(tiny, [request], loop_options(cfg), 1))
    return result, trace_of(result, recorder, options)


def test_a_trace_is_the_answer_as_decoded_and_names_who_chose_each_token(tiny, tiny_prompt):
    result, trace = decode_trace(tiny, tiny_prompt)
    assert trace.ids == result.ids and len(trace.roles) == len(trace.ids) == len(trace.labels)
    delimiters = {tiny.layout.special["<|begin_of_reflection|>"], tiny.layout.special["<|end_of_reflection|>"]}
    forced = [i for i, r in zip(trace.ids, trace.roles) if r == FORCED]
    assert len(forced) == result.counts.forced > 0 and set(forced) <= delimiters
    for label, role in zip(trace.labels, trace.roles):
        if label in ("spoken_text", "spoken_audio"):
            assert role == SPOKEN
        if label == "reflection":
            assert role == HIDDEN
    # every hidden token sampled: the reflections' content and the closings the model chose
    assert trace.hidden_count >= result.counts.hidden > 0
    assert [h["text"] for h in trace.hidden_text] == [h.text for h in result.hidden]
    assert trace.strategy == "reempathy" and trace.chunk_layout == {"text_tokens": 3, "audio_tokens": 6}


def test_a_sampled_stop_token_ends_the_trace_as_the_policy_chose_it(tiny, tiny_prompt):
    result, trace = decode_trace(tiny, tiny_prompt, "sft", {}, extra=[StopAt(tiny, 6)])
    assert result.stop_reason == "stop_token" and len(result.ids) == 5
    assert trace.ids == [*result.ids, tiny.layout.stop_ids[0]] and trace.roles == SPOKEN * 6


def test_the_loss_mask_keeps_the_policys_tokens_and_drops_hidden_ones_when_masked(tiny, tiny_prompt):
    _, trace = decode_trace(tiny, tiny_prompt)
    assert trace.loss_mask(hidden=True) == [int(r != FORCED) for r in trace.roles]
    assert trace.loss_mask(hidden=False) == [int(r == SPOKEN) for r in trace.roles]


def test_a_trace_round_trips_through_the_record_schema(tiny, tiny_prompt):
    _, trace = decode_trace(tiny, tiny_prompt)
    again = Trace.from_json(DecodedTrace.model_validate(trace.to_json()).model_dump(mode="json"))
    assert again == trace


@pytest.mark.parametrize("change, message", [
    ({"roles": "s"}, "trace roles must be one of"),
    ({"labels": [["spoken_audio", 1]]}, "trace labels must be runs"),
    ({"ids": [-1]}, "non-negative token ids"),
])
def test_a_damaged_trace_makes_the_record_bad_and_says_why(tiny, tiny_prompt, change, message):
    _, trace = decode_trace(tiny, tiny_prompt)
    doc = trace.to_json()
    doc.update(change)
    if "ids" in change:
        doc["roles"], doc["labels"] = "s", [["spoken_audio", 1]]
    with pytest.raises(ValidationError, match=message):
        Record.model_validate({"messages": [{"role": "user", "text": "hi"},
                                            {"role": "assistant", "units": [1], "trace": doc}]})


def trace_record(tiny, tiny_prompt_text, chosen: Trace, rejected: Trace) -> SourcedRecord:
    """A pairs record whose answers carry ``chosen`` and ``rejected`` as their traces (scores make the first chosen)."""
    good = {"need_support": 5, "wording_appropriateness": 5, "emotion_understanding": 5, "emotional_support": 5}
    bad = {k: 1 for k in good}
    doc = {
        "messages": [{"role": "user", "text": tiny_prompt_text},
                     {"role": "assistant", "units": [1, 2], "trace": chosen.to_json()}],
        "assessment": {"text": "good", "scores": good},
        "rejected": {"role": "assistant", "units": [3], "trace": rejected.to_json(), "assessment": {"text": "bad", "scores": bad}},
    }
    return SourcedRecord("pairs.jsonl:1", Record.model_validate(doc))


PROMPT_TEXT = "I lost my keys and missed the bus."


@pytest.fixture(scope="module")
def two_traces(tiny, tiny_prompt):
    return decode_trace(tiny, tiny_prompt, seed=1)[1], decode_trace(tiny, tiny_prompt, seed=2)[1]


def test_a_whole_trace_pair_trains_the_decoded_ids_with_forced_tokens_out_of_the_loss(tiny, tiny_prompt, two_traces):
    a, b = two_traces
    pair = build_dpo(trace_record(tiny, PROMPT_TEXT, a, b), tiny)
    assert pair.prompt_ids == tiny_prompt
    assert (pair.chosen_ids, pair.rejected_ids) == (a.ids, b.ids)
    assert pair.chosen_mask == a.loss_mask(True) and pair.rejected_mask == b.loss_mask(True)
    assert pair.chosen_spans == a.labels and pair.policy.strategy == "reempathy"


def test_masked_hidden_tokens_stay_out_of_a_whole_trace_pairs_loss(tiny, two_traces):
    a, b = two_traces
    pair = build_dpo(trace_record(tiny, PROMPT_TEXT, a, b), tiny, DpoBuild(hidden="mask"))
    assert pair.chosen_mask == a.loss_mask(False) and HIDDEN in a.roles
    assert all(m == 0 for m, r in zip(pair.chosen_mask, a.roles) if r == HIDDEN)


def test_traces_false_trains_the_spoken_answers_instead(tiny, two_traces):
    a, b = two_traces
    pair = build_dpo(trace_record(tiny, PROMPT_TEXT, a, b), tiny, DpoBuild(traces=False))
    assert pair.chosen_mask is None and pair.policy is None
    assert pair.chosen_ids == [tiny.layout.unit_to_token(1), tiny.layout.unit_to_token(2), tiny.layout.stop_ids[0]]


def test_a_pair_with_a_trace_on_one_side_only_is_refused_naming_the_record(tiny, two_traces):
    sr = trace_record(tiny, PROMPT_TEXT, *two_traces)
    sr.record.rejected.trace = None
    with pytest.raises(InputError, match=r"pairs.jsonl:1: the rejected answer has no trace but the other has"):
        build_dpo(sr, tiny)


def test_the_preference_batch_puts_exactly_the_masked_tokens_in_the_loss(tiny, tiny_prompt, two_traces):
    a, b = two_traces
    pair = build_dpo(trace_record(tiny, PROMPT_TEXT, a, b), tiny, DpoBuild(hidden="mask"))
    batch = PreferenceCollator(pad_id=0)([{"prompt_ids": pair.prompt_ids, "chosen_ids": pair.chosen_ids,
                                           "rejected_ids": pair.rejected_ids, "chosen_mask": pair.chosen_mask,
                                           "rejected_mask": pair.rejected_mask}])
    n = len(tiny_prompt)
    assert batch["input_ids"][0, : n + len(a.ids)].tolist() == tiny_prompt + a.ids
    assert batch["completion_mask"][0, : n + len(a.ids)].tolist() == [0] * n + a.loss_mask(False)
    assert batch["completion_mask"][1, : n + len(b.ids)].tolist() == [0] * n + b.loss_mask(False)
    assert batch["attention_mask"][1].sum() == n + len(b.ids)


def final_hidden_grads(model, run):
    """The gradient of the loss ``run()`` returns with respect to the model's final hidden states (after the last norm).

    The final hidden state at position p feeds only the LM head's prediction of token p + 1, so its
    gradient is non-zero exactly when that token is in the loss.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kept = []

    def keep(module, args, output):
        if output.requires_grad:  # the reference model's forward runs without gradients
            output.retain_grad()
            kept.append(output)

    handle = base.model.norm.register_forward_hook(keep)
    try:
        loss = run()
        loss.backward()
    finally:
        handle.remove()
    assert len(kept) == 1
    return kept[0].grad


@pytest.mark.parametrize("hidden", ["train", "mask"])
def test_hidden_tokens_get_gradient_in_whole_trace_dpo_and_none_when_masked(tmp_path, tiny, tiny_prompt, two_traces, hidden):
    from reempathy.backbones.tiny import TinyOptions, load_tiny
    from reempathy.training.config import load_train_config
    from reempathy.training.train import lora_config, make_dpo_trainer

    a, b = two_traces
    backbone = load_tiny(TinyOptions())
    cfg = load_train_config(None, data={"strategy": {"name": "dpo", "hidden": hidden}, "data": {"path": "unused.jsonl"},
                                        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "batch_size": 1}})
    options = cfg.strategy_options()
    pair = build_dpo(trace_record(backbone, PROMPT_TEXT, a, b), backbone, options)
    trainer = make_dpo_trainer(cfg, backbone, lora_config(cfg, cfg.spec.delimiters(options), False, backbone), options,
                                [pair], (), False)
    inputs = trainer.data_collator([trainer.train_dataset[0]])
    grads = final_hidden_grads(trainer.model, lambda: trainer.compute_loss(trainer.model, inputs))
    n = len(tiny_prompt)
    for row, trace in ((0, a), (1, b)):
        reaches = [grads[row, n + c - 1].abs().sum().item() for c in range(len(trace.ids))]
        for got, role in zip(reaches, trace.roles):
            if role == FORCED or (role == HIDDEN and hidden == "mask"):
                assert got == 0.0
            else:
                assert got > 0.0
    assert any(r == HIDDEN for r in a.roles + b.roles)


def test_pairs_of_different_policies_cannot_train_one_checkpoint(tiny, tiny_prompt, two_traces):
    from reempathy.training.train import trace_policy

    a, b = two_traces
    first = build_dpo(trace_record(tiny, PROMPT_TEXT, a, b), tiny)
    _, c = decode_trace(tiny, tiny_prompt, options={**REEMPATHY, "text_tokens": 4}, seed=3)
    _, d = decode_trace(tiny, tiny_prompt, options={**REEMPATHY, "text_tokens": 4}, seed=4)
    second = build_dpo(trace_record(tiny, PROMPT_TEXT, c, d), tiny)
    assert trace_policy([first, first], "pairs.jsonl").strategy == "reempathy"
    with pytest.raises(InputError, match="holds traces of different policies"):
        trace_policy([first, second], "pairs.jsonl")
    plain = build_dpo(trace_record(tiny, PROMPT_TEXT, a, b), tiny, DpoBuild(traces=False))
    with pytest.raises(InputError, match="mixes pairs with decoded traces and pairs without"):
        trace_policy([first, plain], "pairs.jsonl")


def test_a_chunk_layout_a_checkpoint_cannot_record_is_refused_before_training(tmp_path, tiny, two_traces):
    import dataclasses

    from reempathy.errors import ConfigError
    from reempathy.training.config import load_train_config
    from reempathy.training.train import train

    a, b = (dataclasses.replace(t, chunk_layout={"beats": 3}) for t in two_traces)  # a plugin strategy's own layout
    data = tmp_path / "pairs.jsonl"
    data.write_text(trace_record(tiny, PROMPT_TEXT, a, b).record.model_dump_json(exclude_none=True) + "\n", encoding="utf-8")
    cfg = load_train_config(None, data={"backbone": {"name": "tiny"}, "strategy": {"name": "dpo"}, "data": {"path": str(data)},
                                        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "batch_size": 1}})
    with pytest.raises(ConfigError, match=r"the traces' strategy 'reempathy' reports the chunk layout \{'beats': 3\}"):
        train(cfg, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
