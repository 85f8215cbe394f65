"""The ``empathyeval`` evaluator: load a trained checkpoint, hear each dialogue, predict four scores, write an assessment.

Where it decides:

- ``EmpathyEval.__init__`` refuses to score without a trained checkpoint: the heads of an
  untrained model would give numbers that mean nothing.
- ``item_turns`` decides what is heard and what is read (see ``audio``); a record whose audio
  cannot be read is that record's failure, a missing speech decoder is the whole run's error.
- Scores come from the heads on the default task prompt; the text comes from greedy generation
  on ``item.instruction`` when given (a reflection prompt, say), else on the default prompt.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from reempathy.backbones.quiet import no_loading_bar
from reempathy.errors import ConfigError, InputError
from reempathy.evaluation.base import EMPATHY_SCORES, EvalItem, Evaluation
from reempathy.evaluation.empathyeval.audio import AudioSource
from reempathy.evaluation.empathyeval.model import EmpathyEvalModel, ScoreHeads, clip_score
from reempathy.evaluation.empathyeval.omni import Omni, load_omni
from reempathy.evaluation.empathyeval.options import EmpathyEvalOptions
from reempathy.evaluation.empathyeval.prompt import Example, HeardTurn, collate, encode_dialogue, target_ids


def item_turns(item: EvalItem, audio: AudioSource) -> list[HeardTurn]:
    """The dialogue and the answer as turns, heard where they have a WAV or units."""
    turns = [
        HeardTurn(str(m.get("role", "user")), m.get("text"), audio.waveform(m.get("audio"), m.get("units")))
        for m in item.messages
    ]
    turns.append(HeardTurn("assistant", item.answer_text, audio.waveform(item.answer_wav, item.answer_units)))
    return turns


def make_example(
    omni: Omni, item: EvalItem, audio: AudioSource, assessment: str | None = None, scores: list[float] | None = None,
    task: str | None = None,
) -> Example:
    """One batchable example of ``item`` (with training targets when given)."""
    ids, waves, start = encode_dialogue(omni, item_turns(item, audio), task)
    return Example(ids, waves, target_ids(omni, assessment), scores, start)


@torch.no_grad()
def predict(model: EmpathyEvalModel, omni: Omni, examples: Sequence[Example], device: Any = None) -> list[list[float]]:
    """Raw head outputs per example (not clipped)."""
    batch = collate(omni, examples, with_targets=False)
    batch.pop("labels")
    batch.pop("scores", None)
    batch.pop("score_mask", None)
    dev = device or next(model.parameters()).device
    batch = {k: v.to(dev) for k, v in batch.items()}
    return model(**batch)["predictions"].tolist()


@torch.no_grad()
def generate_text(omni: Omni, thinker: Any, example: Example, max_new_tokens: int) -> str:
    """Greedy assessment text of one example."""
    batch = collate(omni, [example], with_targets=False)
    dev = next(thinker.parameters()).device
    kwargs = {k: batch[k].to(dev) for k in ("input_ids", "attention_mask", "input_features", "feature_attention_mask") if k in batch}
    out = thinker.generate(
        **kwargs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(omni.eos_ids),
        pad_token_id=omni.tokenizer.pad_token_id,
    )
    new = out[0, batch["input_ids"].shape[1] :]
    return omni.tokenizer.decode(new, skip_special_tokens=True).strip()


class EmpathyEval:
    """Scores and assessments from a trained EmpathyEval checkpoint."""

    score_names = EMPATHY_SCORES

    def __init__(self, options: EmpathyEvalOptions) -> None:
        from peft import PeftModel
        from safetensors.torch import load_file

        from reempathy.evaluation.empathyeval.checkpoint import HEADS, read_evaluator_checkpoint

        if not options.checkpoint:
            raise ConfigError(
                "empathyeval needs checkpoint = a directory trained by `reempathy train --config "
                "configs/train-empathyeval.toml`: without trained heads its scores would mean nothing"
            )
        manifest = read_evaluator_checkpoint(options.checkpoint)
        self.options = options
        self.manifest = manifest
        self.score_names = tuple(manifest.score_names)
        self.omni = load_omni(options.model or manifest.model, options.device, options.dtype)
        if self.omni.family.name != manifest.family:
            raise ConfigError(
                f"checkpoint {options.checkpoint!r} was trained on a {manifest.family} model, but {self.omni.path!r} is "
                f"{self.omni.family.name}; give the base model it was trained on"
            )
        try:
            with no_loading_bar():
                adapted = PeftModel.from_pretrained(self.omni.thinker, options.checkpoint, is_trainable=False)
            thinker = adapted.merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ConfigError(f"{options.checkpoint}: the adapter does not fit model {self.omni.path!r} ({type(exc).__name__})") from None
        self.omni.thinker = thinker.eval()
        heads = ScoreHeads(self.omni.hidden_size, self.score_names)
        state = load_file(f"{options.checkpoint}/{HEADS}")
        try:
            heads.load_state_dict(state)
        except RuntimeError:
            raise ConfigError(f"{options.checkpoint}/{HEADS}: the heads do not fit model {self.omni.path!r}") from None
        self.model = EmpathyEvalModel(self.omni.thinker, heads.to(options.device)).eval()
        self.audio = AudioSource(self.omni.sampling_rate, options.speech_decoder, options.seed, options.device)

    def evaluate(self, items: Sequence[EvalItem]) -> list[Evaluation]:
        """Per item: the four scores (clipped to 1–5) and, unless ``generate = false``, the assessment text."""
        out = []
        for item in items:
            try:
                example = make_example(self.omni, item, self.audio)
                task_example = make_example(self.omni, item, self.audio, task=item.instruction) if item.instruction else example
            except InputError as exc:  # this record's audio is unusable; the others go on
                out.append(Evaluation(item.id, {}, None, str(exc), None))
                continue
            raw = predict(self.model, self.omni, [example])[0]
            scores = {n: clip_score(v) for n, v in zip(self.score_names, raw)}
            text = generate_text(self.omni, self.omni.thinker, task_example, self.options.max_new_tokens) if self.options.generate else None
            out.append(Evaluation(item.id, scores, text, None, None))
        return out


__all__ = ["EmpathyEval", "item_turns", "make_example", "predict", "generate_text"]
