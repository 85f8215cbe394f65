"""Tiny random Qwen2.5-Omni / Qwen3-Omni-MoE directories in the published layout, built in a second.

The full model class is built from a small config with the talker off (as in the published
Captioner) and saved with ``save_pretrained``, so the weights are ``thinker.*`` safetensors, next
to a fast tokenizer (byte-level BPE plus the Qwen chat and audio tokens) and the Whisper feature
extractor's ``preprocessor_config.json``. For tests and demos: the weights are random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

_CORPUS = """
The user sounds tired and needs to be heard before any advice.
The answer names the feeling, which is good, but the wording is a little flat.
Emotion understanding is strong; emotional support could offer one concrete next step.
I am so sorry you are going through this. That sounds really hard.
Whatever. Just deal with it yourself, it is not a big problem.
The reply ignores the sadness in the voice and changes the subject.
Warm, specific and supportive; it acknowledges the worry and offers company.
""".strip().splitlines()

_SPECIAL = {
    "qwen2.5-omni": {
        "audio_start": "<|audio_bos|>", "audio_end": "<|audio_eos|>", "audio_pad": "<|AUDIO|>",
        "image": "<|IMAGE|>", "video": "<|VIDEO|>", "vision_start": "<|vision_bos|>", "vision_end": "<|vision_eos|>",
    },
    "qwen3-omni-moe": {
        "audio_start": "<|audio_start|>", "audio_end": "<|audio_end|>", "audio_pad": "<|audio_pad|>",
        "image": "<|image_pad|>", "video": "<|video_pad|>", "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>",
    },
}
Family = Literal["qwen2.5-omni", "qwen3-omni-moe"]


def tiny_tokenizer(family: Family, text_vocab: int = 400):
    """A fast tokenizer: byte-level BPE text, then ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` and the media tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=text_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_SPECIAL[family].values()]
    fast.add_special_tokens({"additional_special_tokens": specials})
    fast.eos_token = "<|im_end|>"
    fast.pad_token = "<|endoftext|>"
    return fast


def tiny_config(family: Family, tokenizer, hidden: int = 32, layers: int = 2):
    """The full model config (thinker tiny, talker off) with the tokenizer's media token ids."""
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in _SPECIAL[family].items()}
    vocab = (len(tokenizer) + 7) // 8 * 8
    text = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    )
    audio = dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16, output_dim=hidden)
    common = dict(
        audio_token_id=ids["audio_pad"], image_token_id=ids["image"], video_token_id=ids["video"],
        audio_start_token_id=ids["audio_start"], vision_start_token_id=ids["vision_start"], user_token_id=0,
    )
    if family == "qwen2.5-omni":
        from transformers import Qwen2_5OmniConfig

        thinker = dict(
            audio_config=dict(audio, n_window=100),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden, fullatt_block_indexes=[0]),
            text_config=text, audio_end_token_id=ids["audio_end"], vision_end_token_id=ids["vision_end"], **common,
        )
        return Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False)
    from transformers import Qwen3OmniMoeConfig

    text.update(moe_intermediate_size=hidden // 2, num_experts=4, num_experts_per_tok=2, head_dim=8)
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
    thinker = dict(
        # n_window 50 is the published value, which the published token-count formula assumes
        audio_config=dict(audio, n_window=50, n_window_infer=400, conv_chunksize=50, downsample_hidden_size=8),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                           deepstack_visual_indexes=[0], num_position_embeddings=16),
        text_config=text, **common,
    )
    return Qwen3OmniMoeConfig(thinker_config=thinker, enable_audio_output=False)


def make_tiny_omni_dir(directory: str | Path, family: Family = "qwen2.5-omni", seed: int = 0, hidden: int = 32) -> Path:
    """Write a tiny random model directory of ``family`` (config.json, model.safetensors, tokenizer, preprocessor)."""
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen3OmniMoeForConditionalGeneration, WhisperFeatureExtractor
    from transformers.utils import logging as hf_logging

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(family)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused talker sub-config warns about its default token ids
    try:
        config = tiny_config(family, tok, hidden=hidden)
        cls = Qwen2_5OmniForConditionalGeneration if family == "qwen2.5-omni" else Qwen3OmniMoeForConditionalGeneration
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config)
        model.save_pretrained(out)
    finally:
        hf_logging.set_verbosity(verbosity)
    tok.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=16, sampling_rate=16000).save_pretrained(out)
    return out


__all__ = ["make_tiny_omni_dir", "tiny_tokenizer", "tiny_config"]
