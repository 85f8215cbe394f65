"""``asr-wer``: does the audio say what the text says? A local Whisper transcribes each answer's WAV; WER and CER against its spoken text.

Where it decides:

- :func:`load_whisper` refuses, before any weights are read, a directory that is not a Whisper ASR
  model (``model_type`` ``whisper`` with ``WhisperForConditionalGeneration``; GLM-4-Voice's
  speech tokenizer is a Whisper encoder without an ASR head and is named as such), one without
  safetensors weights, and a ``max_new_tokens`` or ``language`` the model cannot take. Weights load
  through transformers' own Whisper classes: no remote code can run.
- :meth:`AsrWer.evaluate` fails a record, with one line, when its answer has no WAV, no spoken text
  to compare with (empty after normalisation), or audio longer than one Whisper window (30 s):
  long answers are refused rather than silently cut, which would count the cut words as deletions.
  The others are transcribed together, greedily (one ``generate`` call per batch).
- :func:`error_rates` normalises both texts the same way with jiwer's transforms (lowercase,
  punctuation removed — every Unicode ``P*`` character, so ``don't`` is ``dont`` —, runs of
  spaces made one, ends stripped) and computes jiwer's WER over words and CER over characters
  (spaces between words count as characters). Each record's rates are its own: the summary's
  mean is the mean per-record WER, not a corpus WER pooled over all words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from reempathy.backbones.quiet import no_loading_bar
from reempathy.devices import resolve_device
from reempathy.errors import CheckpointError, ConfigError, NotAvailableError
from reempathy.evaluation.base import EvalItem, Evaluation
from reempathy.evaluation.speech.answer import NO_WAV, NoAudio, answer_audio
from reempathy.evaluation.speech.options import WHISPER_PROMPT_TOKENS, AsrWerOptions
from reempathy.speech.audio import resample

SCORES = ("wer", "cer")
ASR_ARCHITECTURE = "WhisperForConditionalGeneration"


def _jiwer() -> Any:
    try:
        import jiwer
    except ImportError:
        raise NotAvailableError("asr-wer needs the jiwer package (a dependency of reempathy): pip install jiwer") from None
    return jiwer


def _transforms() -> tuple[Any, Any]:
    """jiwer's transforms for words and for characters: the same normalisation, then split."""
    jiwer = _jiwer()
    common = [jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(), jiwer.Strip()]
    return jiwer.Compose([*common, jiwer.ReduceToListOfListOfWords()]), jiwer.Compose([*common, jiwer.ReduceToListOfListOfChars()])


def normalise(text: str) -> str:
    """``text`` as WER sees it: lowercase, no punctuation, single spaces, stripped."""
    jiwer = _jiwer()
    return jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(), jiwer.Strip()])(text)


def error_rates(reference: str, hypothesis: str) -> tuple[float, float]:
    """(WER, CER) of ``hypothesis`` against ``reference``, both normalised (module docstring); the reference must have words."""
    if not normalise(reference):
        raise ValueError("the reference has no words after normalisation")
    jiwer = _jiwer()
    words, chars = _transforms()
    wer = jiwer.wer(reference, hypothesis, reference_transform=words, hypothesis_transform=words)
    cer = jiwer.cer(reference, hypothesis, reference_transform=chars, hypothesis_transform=chars)
    return float(wer), float(cer)


@dataclass
class Whisper:
    """A loaded Whisper: model, feature extractor, tokenizer, and the generate arguments the options fixed."""

    model: Any
    feature_extractor: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    generate_kwargs: dict[str, Any]

    @property
    def max_seconds(self) -> float:
        """One window: what the feature extractor holds (30 s for every published Whisper)."""
        return self.feature_extractor.n_samples / self.feature_extractor.sampling_rate

    def transcribe(self, waves: Sequence[np.ndarray]) -> list[str]:
        """Greedy transcripts of mono ``waves`` at the feature extractor's rate, special tokens removed, stripped."""
        from transformers.utils import logging as hf_logging

        feats = self.feature_extractor(
            list(waves), sampling_rate=self.feature_extractor.sampling_rate, return_tensors="pt", return_attention_mask=True
        )
        verbosity = hf_logging.get_verbosity()
        # generate warns about settings the published generation configs carry (max_length beside
        # max_new_tokens) on every call; the transcript does not depend on them.
        hf_logging.set_verbosity_error()
        try:
            with torch.inference_mode():
                ids = self.model.generate(
                    feats.input_features.to(self.device, self.dtype),
                    attention_mask=feats.attention_mask.to(self.device),
                    **self.generate_kwargs,
                )
        finally:
            hf_logging.set_verbosity(verbosity)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _check_directory(p: Path) -> dict[str, Any]:
    """``config.json`` of a Whisper ASR directory with safetensors weights; CheckpointError naming what is wrong."""
    if not p.is_dir():
        raise CheckpointError(f"asr-wer path {str(p)!r} is not a directory; give a local Whisper model directory")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"asr-wer path {str(p)!r} has no config.json; give a local Whisper model directory")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("model_type") != "whisper":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise CheckpointError(f"asr-wer path {str(p)!r}: model_type {kind!r} is not whisper; give a Whisper ASR model directory")
    arch = config.get("architectures") or [ASR_ARCHITECTURE]
    if ASR_ARCHITECTURE not in arch:
        raise CheckpointError(
            f"asr-wer path {str(p)!r} holds {', '.join(map(str, arch))}, not {ASR_ARCHITECTURE} (GLM-4-Voice's speech "
            "tokenizer is a Whisper encoder without a transcribing decoder); give a Whisper ASR model directory"
        )
    if not any(p.glob("*.safetensors")):
        raise CheckpointError(
            f"asr-wer path {str(p)!r} has no .safetensors weights; only safetensors are loaded (pickled .bin weights "
            "can run code): save the model again with transformers' save_pretrained, which writes safetensors"
        )
    return config


def _language(options: AsrWerOptions, lang_to_id: dict[str, int], where: str) -> str | None:
    """The language code for ``generate`` (None: the model detects it), checked against the model's language tokens."""
    if options.language is None:
        return None
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    given = options.language.strip().lower().removeprefix("<|").removesuffix("|>")
    code = TO_LANGUAGE_CODE.get(given, given)
    if f"<|{code}|>" not in lang_to_id:
        known = ", ".join(sorted(t.strip("<|>") for t in lang_to_id)[:12])
        raise ConfigError(f"asr-wer language = {options.language!r} is not a language of {where}; it knows {known}…")
    return code


def load_whisper(options: AsrWerOptions) -> Whisper:
    """Load ``options.path`` (checks in the module docstring) on ``options.device``."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    p = Path(options.path)
    config = _check_directory(p)
    limit = int(config.get("max_target_positions", 448)) - WHISPER_PROMPT_TOKENS
    if options.max_new_tokens > limit:
        raise ConfigError(
            f"asr-wer max_new_tokens = {options.max_new_tokens}: the model at {str(p)!r} writes at most {limit} tokens "
            f"(max_target_positions {limit + WHISPER_PROMPT_TOKENS} less {WHISPER_PROMPT_TOKENS} prompt tokens); lower it"
        )
    device = resolve_device(options.device, "asr-wer device")
    dtype = getattr(torch, options.dtype)
    if not (p / "preprocessor_config.json").is_file():
        raise CheckpointError(f"asr-wer path {str(p)!r} has no preprocessor_config.json (Whisper's feature extractor)")
    try:
        processor = WhisperProcessor.from_pretrained(p)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"asr-wer path {str(p)!r}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
    try:
        with no_loading_bar():
            model = WhisperForConditionalGeneration.from_pretrained(p, dtype=dtype, use_safetensors=True)
    except OSError as exc:
        raise CheckpointError(f"asr-wer path {str(p)!r}: cannot load the weights ({str(exc).splitlines()[0]})") from None
    model.to(device).eval()
    gc = model.generation_config
    # Greedy whatever the directory's generation config says: Whisper's generate takes num_beams
    # from the config, and samples only when given a temperature, which is never passed here.
    gc.num_beams, gc.do_sample = 1, False
    kwargs: dict[str, Any] = {"max_new_tokens": options.max_new_tokens}
    lang_to_id = getattr(gc, "lang_to_id", None) or {}
    if lang_to_id and getattr(gc, "is_multilingual", True) is not False:
        kwargs["task"] = "transcribe"  # never translate: the reference is in the answer's language
        language = _language(options, lang_to_id, repr(str(p)))
        if language is not None:
            kwargs["language"] = language
    elif options.language is not None:
        raise ConfigError(
            f"asr-wer language = {options.language!r}: the model at {str(p)!r} is English-only (its generation config "
            "has no language tokens, or is_multilingual = false); leave language unset"
        )
    return Whisper(model, processor.feature_extractor, processor.tokenizer, device, dtype, kwargs)


class AsrWer:
    """Transcribes each answer's WAV with a local Whisper; ``wer`` and ``cer`` against the answer's spoken text."""

    score_names = SCORES

    def __init__(self, options: AsrWerOptions) -> None:
        _jiwer()  # a missing package is said before the model loads
        self.options = options
        self.whisper = load_whisper(options)

    def _wave(self, item: EvalItem) -> np.ndarray:
        """The answer's mono samples at the model's rate; NoAudio when it cannot be transcribed whole."""
        audio = answer_audio(item)
        if audio.seconds > self.whisper.max_seconds:
            raise NoAudio(
                f"the answer's audio is {audio.seconds:.1f} s; asr-wer transcribes at most {self.whisper.max_seconds:g} s "
                "(one Whisper window) and does not cut longer answers, which would count the cut words as errors"
            )
        mono = torch.from_numpy(audio.samples.mean(axis=0))
        return resample(mono, audio.sample_rate, self.whisper.feature_extractor.sampling_rate).numpy()

    def evaluate(self, items: Sequence[EvalItem]) -> list[Evaluation]:
        """WER/CER per item; records without spoken text, without a WAV or too long fail with one line."""
        results: dict[int, Evaluation] = {}
        todo: list[tuple[int, np.ndarray]] = []
        for n, item in enumerate(items):
            if not item.answer_wav:
                results[n] = Evaluation(item.id, {}, error=NO_WAV)
                continue
            if not normalise(item.answer_text):
                results[n] = Evaluation(
                    item.id, {}, error="empty reference text: the answer's spoken text has no words (after lowercasing "
                    "and removing punctuation) to compare the transcript with"
                )
                continue
            try:
                todo.append((n, self._wave(item)))
            except NoAudio as exc:
                results[n] = Evaluation(item.id, {}, error=str(exc))
        if todo:
            transcripts = self.whisper.transcribe([wave for _, wave in todo])
            for (n, _), transcript in zip(todo, transcripts):
                wer, cer = error_rates(items[n].answer_text, transcript)
                results[n] = Evaluation(items[n].id, {"wer": wer, "cer": cer}, transcript)
        return [results[n] for n in range(len(items))]


__all__ = ["AsrWer", "Whisper", "load_whisper", "error_rates", "normalise", "SCORES"]
