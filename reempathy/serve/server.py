"""The server's state: the one backbone, the scheduler, the speech parts, the models, the limits.

Where it decides:

* **Readiness** (:meth:`Server.load`, run in a thread at startup): ``/health`` answers 503
  ``loading`` until the backbone, the speech parts and the scheduler are up, then 200 ``ok``
  (``failed`` and 503 with the reason if loading failed), so a load balancer sends nothing early.
* **What a backbone must offer**: rows of one batch (the batched loop's own conditions), speech
  in through a speech tokenizer and out through a speech decoder (either may be missing: then
  that direction is refused per request, with a message). Backbones whose speech comes from a
  talker fed by the decoder's states (Qwen2.5-Omni) are refused at startup: the talker reads one
  row's states and the batched loop does not hand them out per row.
* **One response's plugins and options** (:meth:`Server.response_spec`): the session's model gives
  strategy and processors (new objects per response, as the batched loop wants), sampling is the
  model's with the session's overrides (validated as ``[sampling]``), the budget is the
  session's, capped by ``max_output_tokens``.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import ValidationError

from reempathy.backbones.base import Backbone, Turn
from reempathy.config import SamplingConfig, describe_config_error
from reempathy.decoding.loop import LoopOptions
from reempathy.registry import Registry
from reempathy.errors import ConfigError, InputError, NotAvailableError
from reempathy.options import check_text
from reempathy.runner import build_plugins, load_backbone, loop_options
from reempathy.serve.config import Model, ServeConfig
from reempathy.serve.metrics import Metrics
from reempathy.serve.scheduler import Scheduler
from reempathy.serve.stream import ResponseSpec

log = logging.getLogger("reempathy.serve")

SAMPLING_KEYS = ("greedy", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


class Server:
    """Everything the HTTP and websocket handlers share."""

    def __init__(self, config: ServeConfig, registry: Registry, api_key: str | None = None, backbone: Backbone | None = None) -> None:
        self.config = config
        self.settings = config.settings
        self.registry = registry
        self.api_key = api_key
        self.models: dict[str, Model] = config.models
        self.metrics = Metrics()
        self.status = "loading"
        self.error: str | None = None
        self.ready = threading.Event()
        self.backbone: Backbone | None = backbone
        self.scheduler: Scheduler | None = None
        self.speech_pool = ThreadPoolExecutor(self.settings.speech_threads, thread_name_prefix="reempathy-speech")
        self.sessions = 0
        self._tmp: tempfile.TemporaryDirectory | None = None
        m = self.metrics
        m.watch("reempathy_ready", "1 once the model is loaded and the scheduler runs", lambda: float(self.status == "ok"))
        m.watch("reempathy_sessions", "Realtime sessions open", lambda: float(self.sessions))
        m.watch("reempathy_rows_running", "Rows of the batch decoding now", lambda: float(self.scheduler.running if self.scheduler else 0))
        m.watch("reempathy_queue", "Responses waiting for the next step boundary", lambda: float(self.scheduler.waiting if self.scheduler else 0))
        m.watch("reempathy_batch_steps", "Forward calls of the batch so far", lambda: float(self.scheduler.steps if self.scheduler else 0))
        m.watch("reempathy_tokens_per_second", "Generated tokens per second, recent", m.tokens_per_second)

    # --- startup and shutdown ------------------------------------------------------------------------

    def load(self) -> None:
        """Load the backbone and speech parts and start the scheduler; sets ``status`` (never raises)."""
        try:
            t0 = time.perf_counter()
            first = self.config.first
            backbone = self.backbone if self.backbone is not None else load_backbone(first, self.registry)
            check_servable(backbone)
            self.backbone = backbone
            self._attach_speech(backbone)
            options = loop_options(first)
            options.max_new_tokens = self.settings.max_output_tokens
            scheduler = Scheduler(
                backbone, options, rows=self.settings.max_sessions, prefill_tokens=self.settings.prefill_tokens_per_step
            )
            scheduler.start()
            self.scheduler = scheduler
            self.status = "ok"
            log.info("ready in %.1f s: %s on %s", time.perf_counter() - t0, ", ".join(self.models), backbone.model.device)
        except Exception as exc:  # reported by /health and every request; the process stays up to say so
            self.status = "failed"
            self.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (ConfigError, NotAvailableError, InputError)) else str(exc)
            log.error("loading failed: %s", self.error)
        finally:
            self.ready.set()

    def close(self) -> None:
        """Stop the scheduler and the speech threads."""
        if self.scheduler is not None:
            self.scheduler.stop()
        self.speech_pool.shutdown(wait=False, cancel_futures=True)
        if self._tmp is not None:
            self._tmp.cleanup()

    def _attach_speech(self, backbone: Backbone) -> None:
        s = self.settings
        device = backbone.model.device
        if s.speech_tokenizer is not None and backbone.speech_tokenizer is None:
            from reempathy.speech.tokenizer import load_speech_tokenizer

            path = self._tiny("tokenizer") if s.speech_tokenizer == "tiny" else s.speech_tokenizer
            backbone.speech_tokenizer = load_speech_tokenizer(path, device=device, max_seconds=s.max_audio_seconds)
        if s.speech_decoder is not None and backbone.speech_decoder is None:
            from reempathy.speech.decoder import load_speech_decoder

            path = self._tiny("decoder") if s.speech_decoder == "tiny" else s.speech_decoder
            backbone.speech_decoder = load_speech_decoder(path, device=device)

    def _tiny(self, part: str) -> Path:
        """A tiny random speech tokenizer or decoder, built in a folder that lives as long as the server."""
        from reempathy.speech.tiny import make_tiny_decoder_dir, make_tiny_tokenizer_dir

        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="reempathy-serve-")
        folder = Path(self._tmp.name) / part
        if part == "tokenizer":
            return make_tiny_tokenizer_dir(folder)
        vocab = self.backbone.layout.audio_count if self.backbone is not None else 1024
        return make_tiny_decoder_dir(folder, vocab_size=max(vocab, 1))

    # --- what a response needs ---------------------------------------------------------------------------

    @property
    def hears(self) -> bool:
        """True when spoken input can be turned into the model's units."""
        return self.backbone is not None and self.backbone.speech_tokenizer is not None and not self.backbone.reads_audio

    @property
    def speaks(self) -> bool:
        """True when spoken output can be synthesised."""
        return self.backbone is not None and self.backbone.speech_decoder is not None

    def model(self, name: str | None) -> Model:
        """The model called ``name`` (None: the default); ``InputError`` listing the models otherwise."""
        name = self.config.default_model if name is None else name
        if name not in self.models:
            raise InputError(f"unknown model {str(name)[:80]!r}; this server offers: {', '.join(self.models)}")
        return self.models[name]

    def sampling(self, model: Model, overrides: dict[str, Any] | None) -> SamplingConfig:
        """The model's ``[sampling]`` with a session's overrides, validated as ``[sampling]`` is."""
        overrides = dict(overrides or {})
        unknown = [k for k in overrides if k not in SAMPLING_KEYS]
        if unknown:
            raise InputError(f"unknown sampling key {unknown[0]!r}; a session may set: {', '.join(SAMPLING_KEYS)}")
        try:
            return SamplingConfig.model_validate({**model.cfg.sampling.model_dump(), **overrides})
        except ValidationError as exc:
            raise InputError(describe_config_error(exc, "sampling", {}, SamplingConfig)) from None

    def budget(self, requested: Any, model: Model | None = None) -> int:
        """A response's token budget: ``requested``, or the model's ``max_new_tokens`` (None), or the cap ("inf").

        Never above ``max_output_tokens``: an explicit larger request is refused, the model's default is cut.
        """
        cap = self.settings.max_output_tokens
        if requested is None:
            return min(cap, model.cfg.decode.max_new_tokens) if model is not None else cap
        if requested == "inf":
            return cap
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise InputError(f"max_output_tokens must be a whole number of at least 1 or \"inf\", got {requested!r}")
        if requested > cap:
            raise InputError(f"max_output_tokens {requested} is above this server's cap of {cap}")
        return requested

    def prompt_ids(self, turns: Sequence[Turn], instructions: str | None, model: Model) -> list[int]:
        """Token ids of a conversation that asks for the next answer; ``InputError`` if it does not fit."""
        backbone = self._backbone()
        system = instructions if instructions is not None else model.cfg.decode.system_prompt
        if system:
            check_text(system, "the instructions")
        full = ([Turn("system", text=system)] if system else []) + list(turns)
        built = backbone.build_prompt_inputs(full)
        if built.prefill_inputs:
            raise NotAvailableError(f"backbone {backbone.name!r} reads audio as model inputs; the server cannot serve it yet")
        if len(built.ids) >= backbone.max_context:
            raise InputError(
                f"the conversation is {len(built.ids)} tokens, as long as the backbone's context of "
                f"{backbone.max_context}; start a new session"
            )
        return built.ids

    def response_spec(
        self,
        model: Model,
        prompt_ids: list[int],
        sampling: dict[str, Any] | None,
        max_tokens: Any,
        audio: bool,
        hidden_text: bool,
    ) -> ResponseSpec:
        """The row for one response: new strategy and processor objects, options, seed, what to stream."""
        backbone = self._backbone()
        if audio and not self.speaks:
            raise InputError(
                "this server has no speech decoder, so it answers in text only; ask for output_modalities [\"text\"]"
            )
        cfg = model.cfg.model_copy(update={"sampling": self.sampling(model, sampling)})
        strategy, processors = build_plugins(cfg, backbone, self.registry)
        options: LoopOptions = loop_options(cfg)
        options.max_new_tokens = self.budget(max_tokens, model)
        return ResponseSpec(
            prompt_ids, strategy, processors, options, cfg.sampling.seed, audio=audio, hidden_text=hidden_text,
            block_sizes=tuple(self.settings.speech_blocks),
        )

    def units(self, samples: torch.Tensor, sample_rate: int) -> list[int]:
        """Speech units of a spoken turn (run in a speech thread); ``InputError`` if too long or silent of units."""
        backbone = self._backbone()
        if not self.hears:
            raise InputError("this server has no speech tokenizer, so it cannot hear audio; send text items")
        seconds = samples.shape[0] / sample_rate
        if seconds > self.settings.max_audio_seconds:
            raise InputError(f"the spoken turn is {seconds:.1f} s long; this server takes at most {self.settings.max_audio_seconds:g} s")
        units = backbone.speech_tokenizer.units(samples, sample_rate)  # type: ignore[union-attr]
        if not units:
            raise InputError("the spoken turn gave no speech units; send more audio")
        return units

    def count_token(self) -> None:
        """One more generated token (called by row observers in the scheduler thread)."""
        self.metrics.generated += 1

    def _backbone(self) -> Backbone:
        if self.backbone is None or self.status != "ok":
            raise NotAvailableError(f"the server is not ready ({self.status}); wait for /health to say ok")
        return self.backbone


def check_servable(backbone: Backbone) -> None:
    """Refuse a backbone the server cannot batch or speak for (one line, what to use instead)."""
    if backbone.talker is not None or backbone.stream.text_only:
        raise NotAvailableError(
            f"backbone {backbone.name!r} speaks through a talker fed by one row's decoder states; `reempathy serve` "
            "batches rows and cannot feed it yet: use `reempathy decode --audio IN.wav --out OUT.wav` for this backbone"
        )


__all__ = ["SAMPLING_KEYS", "Server", "check_servable"]
