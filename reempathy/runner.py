"""Config → backbone → session plugins → loop → result: the one path every command takes."""

from __future__ import annotations

from typing import Any, Sequence

from reempathy.backbones.base import Backbone, PromptInputs, Turn
from reempathy.config import SAMPLING_CHAIN, DecodeConfig
from reempathy.decoding.failures import remember_name
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.registry import Registry
from reempathy.decoding.result import DecodeResult
from reempathy.errors import ConfigError, InputError
from reempathy.options import check_text
from reempathy.speech.units import MAX_UNITS_BYTES, read_units  # noqa: F401 - read_units was at home here



def load_backbone(cfg: DecodeConfig, registry: Registry) -> Backbone:
    """Build the configured backbone through its registered factory, with the special tokens its strategy needs.

    The tokens are added before a checkpoint is applied: an adapter trained with them holds their rows.
    """
    backbone = registry.create("backbone", cfg.backbone.name, cfg.backbone.options)
    add_strategy_tokens(backbone, cfg, registry)
    if cfg.decode.checkpoint:
        from reempathy.checkpoints import apply_checkpoint

        backbone = apply_checkpoint(backbone, cfg.decode.checkpoint)
    return backbone


def add_strategy_tokens(backbone: Backbone, cfg: DecodeConfig, registry: Registry) -> list[str]:
    """The special tokens ``cfg``'s strategy declared (``register(..., special_tokens=...)``), added to ``backbone``
    where missing; the names added."""
    return backbone.add_special_tokens(registry.get("strategy", cfg.strategy.name).special_tokens or ())


def build_plugins(cfg: DecodeConfig, backbone: Backbone, registry: Registry) -> tuple[object, list[object]]:
    """The strategy object and the ordered processors: configured ones first, then the sampling chain.

    A backbone loaded for another strategy (a sweep shares one) gets this strategy's special tokens first.
    """
    add_strategy_tokens(backbone, cfg, registry)
    # The registered names are remembered so that a run hook's failure names the component.
    strategy = registry.create("strategy", cfg.strategy.name, cfg.strategy.options, backbone)
    remember_name(strategy, cfg.strategy.name)
    processors = []
    for name, options in [(p.name, p.options) for p in cfg.processors] + sampling_chain(cfg, backbone):
        processor = registry.create("processor", name, options, backbone)
        remember_name(processor, name)
        processors.append(processor)
    return strategy, processors


def sampling_chain(cfg: DecodeConfig, backbone: Backbone) -> list[tuple[str, dict[str, Any]]]:
    """``[sampling]`` as processors, in transformers' order; unset values take the backbone's defaults."""
    s = cfg.sampling
    if s.greedy:
        return []
    d = backbone.sampling_defaults

    def pick(name: str) -> Any:
        value = getattr(s, name)
        return d.get(name) if value is None else value

    chain: list[tuple[str, dict[str, Any]]] = []
    for key, (name, option, off) in SAMPLING_CHAIN.items():
        if (value := pick(key)) not in (None, off):
            chain.append((name, {option: value}))
    return chain


def build_prompt_inputs(
    backbone: Backbone,
    prompt: str | None = None,
    units: list[int] | None = None,
    system_prompt: str | None = None,
    audio: str | None = None,
) -> PromptInputs:
    """The model inputs of a one-turn prompt from text, speech units or a WAV file (``audio``)."""
    if units is None and audio is None and (prompt is None or not prompt.strip()):
        raise InputError("the prompt is empty; give --prompt TEXT or --units FILE")
    for what, text in (("the prompt", prompt), ("the system prompt", system_prompt)):
        if text is not None:
            try:
                check_text(text, what)
            except ValueError as exc:
                raise InputError(str(exc)) from None
    if audio is not None and not backbone.reads_audio:
        raise ConfigError(
            f"backbone {backbone.name!r} does not read WAV files in its prompt; turn the audio into units "
            "with its speech tokenizer first"
        )
    if units is not None:
        if backbone.layout.audio_count == 0:
            raise InputError(
                f"backbone {backbone.name!r} has no audio-unit tokens, so speech units cannot be its prompt; "
                "give --prompt TEXT or --audio IN.wav"
            )
        bad = [u for u in units if not 0 <= u < backbone.layout.audio_count]
        if bad:
            raise InputError(
                f"unit id {bad[0]} is outside the audio range 0..{backbone.layout.audio_count - 1} of backbone "
                f"{backbone.name!r} ({len(bad)} ids out of range); check the units come from this backbone's speech tokenizer"
            )
    turns = []
    if system_prompt:
        turns.append(Turn("system", text=system_prompt))
    heard = units is not None or audio is not None
    turns.append(Turn("user", text=None if heard else prompt, units=units, audio=audio))
    backbone.check_text_fits(sum(len(t.text or "") for t in turns))  # before a huge text is tokenized
    return backbone.build_prompt_inputs(turns)


def build_prompt_ids(
    backbone: Backbone, prompt: str | None = None, units: list[int] | None = None, system_prompt: str | None = None
) -> list[int]:
    """Token ids of a one-turn prompt from text or speech units."""
    return build_prompt_inputs(backbone, prompt, units, system_prompt).ids


def run_decode(
    cfg: DecodeConfig,
    registry: Registry,
    prompt: str | None = None,
    units_file: str | None = None,
    backbone: Backbone | None = None,
    units: list[int] | None = None,
    observers: Sequence[object] = (),
    audio: str | None = None,
) -> DecodeResult:
    """Decode one answer as ``cfg`` says; ``prompt``/``units_file``/``units``/``audio`` override ``[decode]``.

    ``observers`` are plugin objects added after the configured processors (read-only hooks, e.g. streaming).
    ``audio`` is a WAV file for a backbone that reads audio in its prompt (``Backbone.reads_audio``).
    """
    if prompt is not None and units_file is not None:
        raise ConfigError("give either --prompt or --units, not both")
    if units is not None and (prompt is not None or units_file is not None):
        raise ConfigError("give speech units or a prompt/units file, not both")
    if audio is not None and (prompt is not None or units_file is not None or units is not None):
        raise ConfigError("give an audio file or a prompt/units, not both")
    options = loop_options(cfg)
    backbone = backbone or load_backbone(cfg, registry)
    strategy, processors = build_plugins(cfg, backbone, registry)
    processors = [*processors, *observers]
    if units is None and audio is None:
        prompt = prompt if prompt is not None else (None if units_file else cfg.decode.prompt)
        units_file = units_file if units_file is not None else (None if prompt is not None else cfg.decode.units)
        units = read_units(units_file) if units_file else None
    inputs = build_prompt_inputs(backbone, prompt, units, cfg.decode.system_prompt, audio=audio)
    return decode(backbone, inputs.ids, strategy, processors, options, prefill_inputs=inputs.prefill_inputs)


def run_config(cfg: DecodeConfig) -> DecodeConfig:
    """``cfg`` as a command over a data set uses it: ``[decode] prompt``/``units`` cleared, since the records are the prompts."""
    cfg = cfg.model_copy(deep=True)
    cfg.decode.prompt = None
    cfg.decode.units = None
    return cfg


def loop_options(cfg: DecodeConfig) -> LoopOptions:
    """The loop's settings from ``[decode]`` and ``[sampling]`` (shared by ``decode`` and ``run``)."""
    if cfg.decode.compile and cfg.decode.cache != "static":
        raise ConfigError('decode.compile = true needs decode.cache = "static" (a dynamic cache would recompile every step)')
    return LoopOptions(
        max_new_tokens=cfg.decode.max_new_tokens,
        max_spoken_tokens=cfg.decode.max_spoken_tokens,
        max_hidden_tokens=cfg.decode.max_hidden_tokens,
        greedy=cfg.sampling.greedy,
        seed=cfg.sampling.seed,
        strategy_name=cfg.strategy.name,
        cache=cfg.decode.cache,
        compile=cfg.decode.compile,
        attention=cfg.decode.attention,
    )
