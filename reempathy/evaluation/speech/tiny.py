"""A tiny random Whisper ASR directory in the published layout, saved by transformers itself, built in a second.

``WhisperForConditionalGeneration`` from a small config (one encoder and one decoder layer), a
``WhisperTokenizer`` over a byte-level BPE learned on a few sentences plus Whisper's special
tokens (``<|endoftext|>``, ``<|startoftranscript|>``, one language ``<|en|>``, the task tokens,
``<|notimestamps|>``), a ``WhisperFeatureExtractor`` and a generation config with the fields
Whisper's ``generate`` reads (language and task ids, tokens it must not write). There are no
timestamp tokens: ``<|notimestamps|>`` is the last id. For tests and demos: the weights are
random and the transcripts are garbage, but they are what transformers' own ``generate`` gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from reempathy.backbones.quiet import no_loading_bar

_CORPUS = """
I am so sorry you are going through this. That sounds really hard.
I hear you, and I am here for you. Would you like to talk about it?
Congratulations on the new job! You must be so proud.
It is okay to feel nervous before an exam; you prepared well.
""".strip().splitlines()

SPECIALS = (
    "<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
    "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>",
)  # fmt: skip
MEL_BINS = 16  # published models use 80 or 128; the feature extractor is built with the same number
INIT_STD = 0.5  # wider than transformers' 0.02, under which every input gives the same repeated token


def tiny_whisper_tokenizer(text_vocab: int = 300):
    """A ``WhisperTokenizer``: byte-level BPE learned on a few sentences, then Whisper's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=text_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    tok = WhisperTokenizer(vocab=learned["vocab"], merges=[tuple(m) for m in learned["merges"]])
    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS)})
    return tok


def make_tiny_whisper_dir(directory: str | Path, seed: int = 0, hidden: int = 32, layers: int = 1) -> Path:
    """Write a tiny random Whisper ASR directory (config, model.safetensors, generation config, tokenizer, preprocessor)."""
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_whisper_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    eos = ids["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=len(tok), num_mel_bins=MEL_BINS, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * hidden, decoder_ffn_dim=2 * hidden,
        max_source_positions=1500, max_target_positions=64, decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=eos, pad_token_id=eos, bos_token_id=eos, begin_suppress_tokens=None, suppress_tokens=None,
        init_std=INIT_STD,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config)
    # Written as the published generation configs are (not derived from the model config, whose
    # loader drops Whisper's own fields): the language and task ids generate() looks up, and the
    # special tokens a transcript never contains, suppressed as the published suppress_tokens do.
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=eos, pad_token_id=eos, bos_token_id=eos,
        max_length=config.max_target_positions, no_timestamps_token_id=ids["<|notimestamps|>"],
        lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        is_multilingual=True, prev_sot_token_id=ids["<|startofprev|>"],
        suppress_tokens=[i for t, i in ids.items() if t != "<|endoftext|>"], begin_suppress_tokens=[eos],
    )
    with no_loading_bar():  # save_pretrained draws a progress bar per shard
        model.save_pretrained(out)
    tok.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=MEL_BINS, sampling_rate=16000).save_pretrained(out)
    return out


__all__ = ["make_tiny_whisper_dir", "tiny_whisper_tokenizer", "SPECIALS", "MEL_BINS", "INIT_STD"]
