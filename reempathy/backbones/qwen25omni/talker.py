"""Qwen2.5-Omni's speech out: its talker, fed the thinker's states at spoken positions only, then token2wav.

The talker reads one row per answer token, ``last-layer state + input embedding`` of that token
in the thinker (transformers' ``thinker_reply_part``), and writes one codec token per row it
reads; token2wav (flow-matching DiT + BigVGAN) turns the codec tokens into a 24 kHz waveform.

Where it decides:

- which positions are spoken — :meth:`TalkerTurn.reempathy_token_appended`: tokens *sampled*
  while the session is not in a hidden phase. Forced delimiters, reflections and thoughts never
  reach the talker, so a reflection shapes the spoken tokens' states but is never heard.
- when the talker may read them — :meth:`TalkerTurn._release`: once their spoken chunk is
  complete (the session left that speak segment, or the answer ended) and they have been
  through the thinker, so their states exist. Until the answer ends the talker gets neither the
  end-of-text row nor the pad row: feeding those early would tell it the text is over.
- what the talker reads — :class:`TalkerRun`, built as transformers'
  ``Qwen2_5OmniForConditionalGeneration.generate()`` builds it for a whole answer: the prompt's
  rows (state + embedding, audio placeholders' embeddings zeroed) over codec mask tokens, the
  speaker's text-bos embedding over codec pad, the first spoken row over codec bos; then one
  spoken row per step, then the end-of-text row, then the pad row for every later step. Its
  sampling is transformers' own processors in transformers' order (repetition penalty, the
  suppressed codec bos, then temperature, top-k, top-p when sampling); one seeded generator
  draws the codec tokens and then token2wav's starting noise, as transformers' ``generate()``
  does after ``torch.manual_seed(seed)``. The gating changes when the talker runs, never what
  it computes: the codes equal those of a whole-answer run.
"""

from __future__ import annotations

import inspect
import queue
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from reempathy.errors import ConfigError
from reempathy.hooks import hookimpl

if TYPE_CHECKING:
    from reempathy.decoding.result import DecodeResult

SAMPLE_RATE = 24000  # BigVGAN of the published checkpoint: 100 mel frames/s × 240 samples, 2 mel frames per codec token


@dataclass(frozen=True)
class TalkerSettings:
    """How the talker samples and how token2wav integrates (transformers' ``generate()`` defaults)."""

    speaker: str = "Chelsie"
    greedy: bool = False
    temperature: float = 0.9
    top_k: int = 40
    top_p: float = 0.8
    repetition_penalty: float = 1.05
    max_new_tokens: int = 4096
    token2wav_steps: int = 10
    guidance_scale: float = 0.5
    sway_coefficient: float = -1.0


@dataclass
class _Released:
    """Rows handed from the decode to the talker: spoken positions and their rows (and the prompt, first time)."""

    positions: list[int]
    token_ids: list[int]
    rows: torch.Tensor  # [n, hidden]
    prompt_ids: list[int] | None = None
    prompt_rows: torch.Tensor | None = None  # [prompt, hidden]: state + embedding (audio zeroed)


_END = object()


@dataclass
class TalkerInputs:
    """What the talker read, kept for inspection: its prefill and every reply row, with their decode positions."""

    prefill_embeds: torch.Tensor | None = None  # [prompt + 2, hidden], before the codec bos/pad embeddings
    text_ids: list[int] = field(default_factory=list)  # prompt ids, speaker bos, first spoken token
    codec_ids: list[int] = field(default_factory=list)  # codec mask × prompt, codec pad, codec bos
    reply_rows: list[torch.Tensor] = field(default_factory=list)  # one per talker step after the prefill
    reply_positions: list[int | str] = field(default_factory=list)  # decode position, or "eos" / "pad"
    first_position: int | None = None  # the spoken position whose row is in the prefill


class Qwen25OmniTalker:
    """The ``Backbone.talker`` of ``qwen2.5-omni``: talker, token2wav and speakers of one loaded checkpoint."""

    sample_rate = SAMPLE_RATE

    def __init__(self, thinker: Any, talker: Any, token2wav: Any, speakers: dict[str, Any], settings: TalkerSettings, audio_ids: Sequence[int]) -> None:
        if settings.speaker not in speakers:
            raise ConfigError(
                f"talker_speaker {settings.speaker!r} is not in the checkpoint's spk_dict.pt; "
                f"known: {', '.join(sorted(speakers)) or 'none'}"
            )
        self.thinker = thinker
        self.talker = talker
        self.token2wav = token2wav
        self.speakers = speakers
        self.settings = settings
        self.audio_ids = tuple(audio_ids)  # placeholder ids whose embeddings the talker gets as zeros

    def turn(self, seed: int) -> "TalkerTurn":
        """The speech of one answer; ``seed`` draws the codec tokens and then token2wav's noise."""
        return TalkerTurn(self, seed)

    def final_norm(self) -> torch.nn.Module:
        """The thinker's last norm: its output at a position is that position's last-layer state."""
        return self.thinker.model.language_model.norm


class TalkerTurn:
    """One answer's speech: an observer of the decode (records rows) and the talker run that reads them.

    Use it as ``with turn: run_decode(..., observers=[turn])`` (the ``with`` captures the thinker's
    states while the answer is decoded), call :meth:`advance` whenever convenient — possibly
    from another thread — and :meth:`finish` after the decode for the waveform.
    """

    def __init__(self, owner: Qwen25OmniTalker, seed: int) -> None:
        self.owner = owner
        self.seed = seed
        self.inputs = TalkerInputs()
        self.codes: list[int] = []
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._run: TalkerRun | None = None
        self._ended = False
        self._handle: Any = None
        self._reset()

    # --- the decode side (runs in the decoding thread) -------------------------------------

    def _reset(self) -> None:
        self.released: list[list[int]] = []  # the spoken positions of each release, in order (for inspection)
        self._blocks: list[torch.Tensor] = []
        self._captured = 0
        self._spoken: list[int] = []
        self._boundary = 0
        self._released = 0
        self._prompt_sent = False

    def __enter__(self) -> "TalkerTurn":
        def capture(module: Any, args: Any, output: torch.Tensor) -> None:
            # One forward call's states, [1, L, hidden]: the loop sends every position through once, in order.
            self._blocks.append(output[0].detach().clone())
            self._captured += output.shape[1]

        self._handle = self.owner.final_norm().register_forward_hook(capture)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @hookimpl
    def reempathy_decode_start(self, session: Any) -> None:
        if self._handle is None:
            raise RuntimeError("enter the TalkerTurn (`with turn:`) around the decode it observes")
        self._reset()

    @hookimpl
    def reempathy_token_appended(self, session: Any, token_id: int, kind: str) -> None:
        # Called before the loop enters a phase a Switch asks for: `hidden` is the phase it was sampled in.
        if kind == "sampled" and not session.hidden:
            self._spoken.append(len(session.ids) - 1)

    @hookimpl
    def reempathy_phase_change(self, session: Any, old: str | None, new: str) -> None:
        self._boundary = len(session.ids)  # every spoken position before this belongs to a finished chunk

    @hookimpl
    def reempathy_logits(self, session: Any, logits: torch.Tensor) -> None:
        # Logits exist, so every position appended so far has been through the thinker.
        self._release(session, min(self._boundary, session.forwarded))

    @hookimpl
    def reempathy_decode_end(self, session: Any, result: DecodeResult) -> None:
        self._release(session, session.forwarded)
        self._queue.put(_END)

    def _release(self, session: Any, upto: int) -> None:
        end = self._released
        while end < len(self._spoken) and self._spoken[end] < upto:
            end += 1
        if end == self._released:
            return
        if self._captured != session.forwarded:
            raise RuntimeError(
                f"the talker recorded {self._captured} thinker positions but the decode forwarded {session.forwarded}; "
                "was the thinker run outside this decode while the turn was entered?"
            )
        states = torch.cat(self._blocks) if len(self._blocks) > 1 else self._blocks[0]
        self._blocks = [states]
        embed = self.owner.thinker.get_input_embeddings()
        device = states.device
        positions = self._spoken[self._released : end]
        token_ids = [session.ids[p] for p in positions]
        index = torch.tensor(positions, device=device)
        rows = states[index] + embed(torch.tensor(token_ids, device=device)).to(states.dtype)
        batch = _Released(positions, token_ids, rows)
        if not self._prompt_sent:
            prompt_ids = list(session.ids[: session.prompt_len])
            ids = torch.tensor(prompt_ids, device=device)
            embeds = embed(ids).to(states.dtype)
            if self.owner.audio_ids:
                heard = torch.isin(ids, torch.tensor(self.owner.audio_ids, device=device))
                embeds = embeds.masked_fill(heard[:, None], 0.0)
            batch.prompt_ids = prompt_ids
            batch.prompt_rows = states[: session.prompt_len] + embeds
            self._prompt_sent = True
        self._released = end
        self.released.append(list(positions))
        self._queue.put(batch)

    # --- the talker side (runs in whichever thread calls it) --------------------------------

    def advance(self) -> None:
        """Run the talker over every row released so far; never past them before the answer has ended."""
        with torch.inference_mode():
            self._drain()
            if self._run is not None:
                self._run.step_while_fed()

    def finish(self) -> torch.Tensor:
        """After the decode: end the talker's input, run it to its end, return the waveform (``(samples,)`` float32)."""
        with torch.inference_mode():
            self._drain()
            if not self._ended:
                raise RuntimeError("TalkerTurn.finish() before the decode it observes has ended")
            if self._run is None:  # nothing was spoken
                return torch.zeros(0)
            self._run.end_of_text()
            self._run.step_while_fed()
            self.codes = list(self._run.codes)
            return self._run.waveform()

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is _END:
                self._ended = True
                continue
            if self._run is None:
                self._run = TalkerRun(self.owner, self.seed, item, self.inputs)
            else:
                self._run.feed(item)


def _cache_keyword(model: Any) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class TalkerRun:
    """The talker's autoregressive run over released rows; one codec token per step, gated on rows."""

    def __init__(self, owner: Qwen25OmniTalker, seed: int, first: _Released, record: TalkerInputs) -> None:
        self.owner = owner
        self.settings = owner.settings
        talker = owner.talker
        self.talker = talker
        self.device = talker.device
        self.dtype = talker.dtype
        self.record = record
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        config = talker.config
        self.eos_ids = (int(config.tts_codec_pad_token_id), int(config.tts_codec_end_token_id))
        self.processors = self._processors(config)
        self.codes: list[int] = []
        self.done = False
        self.pending: list[tuple[int | str, torch.Tensor]] = []
        self.pad_row: torch.Tensor | None = None  # set at end of text: read for every step after the rest
        self.cache = DynamicCache(config=config)
        self.cache_kw = _cache_keyword(talker)

        thinker_embed = owner.thinker.get_input_embeddings()
        speaker = owner.speakers[self.settings.speaker]
        bos_text = int(speaker["bos_token"])
        if first.prompt_ids is None or first.prompt_rows is None:
            raise RuntimeError("the first rows released to the talker must carry the prompt")
        prompt_len = len(first.prompt_ids)
        bos_embed = thinker_embed(torch.tensor([bos_text], device=first.rows.device)).to(first.rows.dtype)
        embeds = torch.cat([first.prompt_rows, bos_embed, first.rows[:1]], dim=0)
        record.prefill_embeds = embeds.clone()
        record.first_position = first.positions[0]
        record.text_ids = list(first.prompt_ids) + [bos_text, first.token_ids[0]]
        record.codec_ids = [int(talker.codec_mask_token)] * prompt_len + [int(talker.codec_pad_token), int(talker.codec_bos_token)]
        self.sequence = torch.tensor([record.codec_ids], device=self.device)
        self.pending = list(zip(first.positions[1:], first.rows[1:]))
        with torch.inference_mode():
            # No attention mask, as generate() calls it: transformers drops an all-ones mask before the
            # first call (see the module docstring), so the talker's masked branch never runs.
            out = talker(
                inputs_embeds=embeds[None].to(self.dtype),
                input_text_ids=torch.tensor([record.text_ids], device=self.device),
                use_cache=True,
                **{self.cache_kw: self.cache},
            )
        self._take(out.logits[:, -1, :])

    def _processors(self, config: Any) -> LogitsProcessorList:
        s = self.settings
        procs: list[Any] = []
        if s.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
        procs.append(SuppressTokensLogitsProcessor([int(config.tts_codec_start_token_id)], device=self.device))
        if not s.greedy:
            if s.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(s.temperature))
            if s.top_k:
                procs.append(TopKLogitsWarper(top_k=s.top_k))
            if s.top_p < 1.0:
                procs.append(TopPLogitsWarper(top_p=s.top_p))
        return LogitsProcessorList(procs)

    def _take(self, logits: torch.Tensor) -> None:
        scores = self.processors(self.sequence, logits.float())
        if self.settings.greedy:
            code = int(torch.argmax(scores, dim=-1))
        else:
            probs = torch.softmax(scores, dim=-1)
            code = int(torch.multinomial(probs, 1, generator=self.generator))
        self.sequence = torch.cat([self.sequence, torch.tensor([[code]], device=self.device)], dim=1)
        if code in self.eos_ids:
            self.done = True
            return
        self.codes.append(code)
        if len(self.codes) >= self.settings.max_new_tokens:
            self.done = True

    def feed(self, batch: _Released) -> None:
        self.pending.extend(zip(batch.positions, batch.rows))

    def end_of_text(self) -> None:
        """The answer ended: the end-of-text row, then the pad row for every later step (transformers' tail)."""
        embed = self.owner.thinker.get_input_embeddings()
        config = self.talker.config
        ids = torch.tensor([int(config.tts_text_end_token_id), int(config.tts_text_pad_token_id)], device=self.device)
        eos_row, pad_row = embed(ids).to(self.dtype)
        self.pending.append(("eos", eos_row))
        self.pad_row = pad_row

    def _next_row(self) -> tuple[int | str, torch.Tensor] | None:
        if self.pending:
            return self.pending.pop(0)
        if self.pad_row is not None:
            return "pad", self.pad_row
        return None

    def step_while_fed(self) -> None:
        while not self.done:
            nxt = self._next_row()
            if nxt is None:
                return  # gated: the next spoken chunk has not been released yet
            position, row = nxt
            self.record.reply_rows.append(row)
            self.record.reply_positions.append(position)
            out = self.talker(
                input_ids=self.sequence[:, -1:],
                thinker_reply_part=row.to(self.dtype)[None, None, :],
                use_cache=True,
                **{self.cache_kw: self.cache},
            )
            self._take(out.logits[:, -1, :])

    def waveform(self) -> torch.Tensor:
        """token2wav over the codes; its noise continues the talker's generator (as one seeded ``generate()``)."""
        if not self.codes:
            return torch.zeros(0)
        state = self.generator.get_state()
        speaker = self.owner.speakers[self.settings.speaker]
        token2wav = self.owner.token2wav
        device = self.device
        codes = torch.tensor([self.codes], device=device)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if device.type == "cuda":
                torch.cuda.set_rng_state(state.cpu(), device=device)
            else:
                torch.set_rng_state(state)
            wave = token2wav(
                codes,
                conditioning=speaker["cond"].to(device).float().expand(1, -1),
                reference_mel=speaker["ref_mel"].to(device).float().expand(1, -1, -1),
                num_steps=self.settings.token2wav_steps,
                guidance_scale=self.settings.guidance_scale,
                sway_coefficient=self.settings.sway_coefficient,
            )
        return wave.reshape(-1).float().cpu()


__all__ = ["Qwen25OmniTalker", "TalkerTurn", "TalkerRun", "TalkerSettings", "TalkerInputs", "SAMPLE_RATE"]
