"""A tiny Qwen2.5-Omni checkpoint directory in the published on-disk format, built in about a second.

transformers' own ``Qwen2_5OmniForConditionalGeneration`` (thinker with audio and vision
encoders, talker, token2wav) built from a small config with random weights and written with
``save_pretrained`` (``config.json``, ``generation_config.json``, ``model.safetensors``); a
byte-level BPE tokenizer learned on a small corpus with Qwen's special tokens after the text
ids; a ``WhisperFeatureExtractor`` (``preprocessor_config.json``) with few mel bins and 2 s
windows; a ChatML chat template in the published layout written for these tests; and
``spk_dict.pt`` with one random speaker. The backbone under test loads it exactly as it loads a
download.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = (
    "I hear you. That sounds really hard, and it makes sense that you feel tired.",
    "Thank you for telling me. I am here, and we can take this one step at a time.",
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group.",
    "system user assistant The user sounds anxious and needs reassurance.",
)
SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
    "<|tts_pad|>", "<|tts_text_bos|>", "<|tts_text_eod|>", "<|tts_text_bos_single|>",
)  # fmt: skip
TEXT_VOCAB = 300
SPARE_ROWS = 9  # embedding rows past the last token, as the published 152064 rows leave some
SPEAKER = "Chelsie"
CODEC = {"pad": 32, "bos": 33, "end": 34, "mask": 36}
MEL_BINS = 16
# Backbone options the tests load it with: a greedy talker, short, and a 2-step token2wav (seconds, not minutes).
QWEN_TEST_OPTIONS = {"talker_greedy": True, "token2wav_steps": 2, "talker_max_new_tokens": 12}

# Written for these tests in the published template's layout (ChatML; audio parts as
# <|audio_bos|><|AUDIO|><|audio_eos|>; a default system message when none is given).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@lru_cache(maxsize=1)
def _bpe() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok.to_str()


def build_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe()), clean_up_tokenization_spaces=False)
    tok.add_tokens(list(SPECIALS), special_tokens=True)  # in Qwen's order, right after the text ids
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    return tok


def build_config(ids: dict[str, int], vocab_rows: int):
    from transformers import Qwen2_5OmniConfig

    media = dict(
        audio_token_index=ids["<|AUDIO|>"],
        image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"],
        vision_end_token_id=ids["<|vision_eos|>"],
    )
    text = dict(
        vocab_size=vocab_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
    )  # fmt: skip
    thinker = dict(
        text_config=text,
        audio_config=dict(num_mel_bins=MEL_BINS, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          d_model=16, output_dim=32, max_source_positions=64, n_window=8),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        **media,
    )  # fmt: skip
    talker = dict(
        vocab_size=40, embedding_size=32, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=12, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 4]},
        tts_text_start_token_id=ids["<|tts_text_bos|>"], tts_text_end_token_id=ids["<|tts_text_eod|>"],
        tts_text_pad_token_id=ids["<|tts_pad|>"], tts_codec_start_token_id=CODEC["bos"],
        tts_codec_end_token_id=CODEC["end"], tts_codec_pad_token_id=CODEC["pad"], tts_codec_mask_token_id=CODEC["mask"],
        **media,
    )  # fmt: skip
    token2wav = dict(
        dit_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ff_mult=2, emb_dim=16, head_dim=16,
                        block_size=4, look_ahead_layers=[1], look_backward_layers=[0], repeats=2, num_embeds=40,
                        mel_dim=MEL_BINS, enc_emb_dim=8, enc_dim=16, enc_channels=[16, 16, 16, 16, 48],
                        enc_attention_channels=8, enc_se_channels=8),
        bigvgan_config=dict(mel_dim=MEL_BINS, upsample_initial_channel=16, resblock_kernel_sizes=[3],
                            resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8]),
    )  # fmt: skip
    return Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=token2wav)


def make_tiny_qwen25omni_dir(dst: Path, seed: int = 0, spare_rows: int = SPARE_ROWS) -> Path:
    """Write the tiny checkpoint into ``dst`` (created) and return it."""
    from transformers import (
        GenerationConfig,
        Qwen2_5OmniForConditionalGeneration,
        WhisperFeatureExtractor,
    )
    from transformers.utils import logging

    dst.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2_5OmniForConditionalGeneration(build_config(ids, len(tok) + spare_rows))
            # The default initialisation is so small that every logit is ~0; widen the language models'
            # weights so that greedy choices are not decided by float noise.
            with torch.no_grad():
                for part in (model.thinker.model.language_model, model.thinker.lm_head, model.talker):
                    for p in part.parameters():
                        if p.dim() >= 2:
                            p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5)
            speakers = {SPEAKER: {"bos_token": ids["<|tts_text_bos_single|>"], "cond": torch.randn(1, 8),
                                  "ref_mel": torch.randn(1, 12, MEL_BINS)}}  # fmt: skip
        model.save_pretrained(dst)
    finally:
        logging.set_verbosity(before)
    GenerationConfig(eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"]).save_pretrained(dst)
    tok.save_pretrained(dst)
    (dst / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    WhisperFeatureExtractor(feature_size=MEL_BINS, sampling_rate=16000, chunk_length=2, n_samples=32000).save_pretrained(dst)
    torch.save(speakers, dst / "spk_dict.pt")
    return dst
