"""A tiny GLM-4-Voice checkpoint directory in the published on-disk format, built in well under a second.

Random weights in the ChatGLM key layout split over two safetensors shards with an index,
ChatGLM ``config.json`` keys, a tiktoken ``tokenizer.model`` learned on a small built-in
corpus, and ``tokenizer_config.json`` declaring special tokens, a gap, then audio tokens.
The checkpoint's own Python files are present but raise if anyone imports them, so a test
that passes proves no remote code ran.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from functools import lru_cache
from pathlib import Path

import regex
import torch
from safetensors.torch import save_file

# Written out independently of the package under test: the published tokenizer's pattern and
# the fourteen specials its code registers right after the text vocabulary.
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
FIXED_SPECIALS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip
HIDDEN = 64
HEADS = 4
GROUPS = 2
HEAD_DIM = 16
FFN = 128
LAYERS = 2
ROPE_RATIO = 2
AUDIO_COUNT = 64
NUM_MERGES = 300
EXTRA_SPECIALS = ("<|begin_of_audio|>", "<|end_of_audio|>", "<|begin_of_transcription|>", "<|end_of_transcription|>")
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")

CORPUS = """
The quick brown fox jumps over the lazy dog. I'm sure it's fine, we'll see; they've gone and you'd know.
Hello world! Hello there, how are you doing today? I am doing well, thank you very much.
User will provide you with a speech instruction. Do it step by step. First, think about the
instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens.
streaming_transcription
我今天很难过，因为我的朋友离开了。别难过，我会一直陪着你的。你好，世界！谢谢你的帮助。
I feel so sad today 😢 because my friend left. Don't be sad 🙂 I'm here for you ❤️ 👍🏽
Numbers 12345 and 2024-11-25, prices $3.50 and 100%.    Indented    text	with	tabs
    def main():
        return 0


Line one
Line two
"""

_THROW = 'raise RuntimeError("the checkpoint\'s own code must never be executed")\n'


def train_ranks(corpus: str = CORPUS, merges: int = NUM_MERGES) -> dict[bytes, int]:
    """Byte-level BPE ranks learned on ``corpus`` with the GLM-4 pre-tokenization pattern."""
    return dict(_train_ranks(corpus, merges))


@lru_cache(maxsize=4)
def _train_ranks(corpus: str, merges: int) -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(tuple(bytes([b]) for b in piece.encode()) for piece in regex.findall(GLM4_PATTERN, corpus))
    for _ in range(merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merged = a + b
        if merged not in ranks:
            ranks[merged] = len(ranks)
        updated: Counter = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            updated[tuple(out)] += count
        words = updated
    return ranks


def token_ids(text_end: int) -> dict[str, int]:
    """Ids of the fixture's added tokens: specials right after the text, a gap, then audio tokens."""
    ids = {t: text_end + i for i, t in enumerate(FIXED_SPECIALS + EXTRA_SPECIALS)}
    audio_0 = (max(ids.values()) // 32 + 2) * 32  # leave a gap, as the published vocabulary does
    ids.update({f"<|audio_{u}|>": audio_0 + u for u in range(AUDIO_COUNT)})
    return ids


def chatglm_tensors(padded_vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights named and shaped as in the published ChatGLM checkpoint."""

    def rand(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    def norm() -> torch.Tensor:
        return 1.0 + rand(HIDDEN, scale=0.1)

    qkv = (HEADS + 2 * GROUPS) * HEAD_DIM
    t: dict[str, torch.Tensor] = {"transformer.embedding.word_embeddings.weight": rand(padded_vocab, HIDDEN, scale=1.0)}
    for n in range(LAYERS):
        p = f"transformer.encoder.layers.{n}."
        t[p + "input_layernorm.weight"] = norm()
        t[p + "self_attention.query_key_value.weight"] = rand(qkv, HIDDEN, scale=0.2)
        t[p + "self_attention.query_key_value.bias"] = rand(qkv, scale=0.2)
        t[p + "self_attention.dense.weight"] = rand(HIDDEN, HEADS * HEAD_DIM)
        t[p + "post_attention_layernorm.weight"] = norm()
        t[p + "mlp.dense_h_to_4h.weight"] = rand(2 * FFN, HIDDEN)
        t[p + "mlp.dense_4h_to_h.weight"] = rand(HIDDEN, FFN)
    t["transformer.encoder.final_layernorm.weight"] = norm()
    t["transformer.output_layer.weight"] = rand(padded_vocab, HIDDEN)
    rot = HEAD_DIM // 2
    t["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    return t


def make_tiny_glm4voice_dir(path: str | Path, seed: int = 0, *, spare_rows: int = 8) -> Path:
    """Write a tiny glm-4-voice-9b-format checkpoint into ``path``; ``spare_rows`` unused rows above the last token."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    ranks = train_ranks()
    text_end = len(ranks)
    ids = token_ids(text_end)
    padded_vocab = max(ids.values()) + 1 + spare_rows

    with (root / "tokenizer.model").open("w", encoding="ascii") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": not t.startswith("<|audio_")}
        for t, i in ids.items()
    }  # fmt: skip
    (root / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "added_tokens_decoder": added,
                "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
                "clean_up_tokenization_spaces": False,
                "do_lower_case": False,
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 1000000000000000019884624838656,
                "padding_side": "left",
                "remove_space": False,
                "tokenizer_class": "ChatGLM4Tokenizer",
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    config = {
        "_name_or_path": "tiny-glm-4-voice",
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "architectures": ["ChatGLMForConditionalGeneration"],
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "bias_dropout_fusion": True,
        "eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
        "ffn_hidden_size": FFN,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": HIDDEN,
        "kv_channels": HEAD_DIM,
        "layernorm_epsilon": 1.5625e-07,
        "model_type": "chatglm",
        "multi_query_attention": True,
        "multi_query_group_num": GROUPS,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_layers": LAYERS,
        "original_rope": True,
        "pad_token_id": ids["<|endoftext|>"],
        "padded_vocab_size": padded_vocab,
        "post_layer_norm": True,
        "rmsnorm": True,
        "rope_ratio": ROPE_RATIO,
        "seq_length": 512,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.44.1",
        "use_cache": True,
        "vocab_size": padded_vocab,
    }
    (root / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py"):
        (root / name).write_text(_THROW, encoding="utf-8")

    tensors = chatglm_tensors(padded_vocab, torch.Generator().manual_seed(seed))
    first = [n for n in tensors if n.startswith(("transformer.embedding", "transformer.encoder.layers.0."))]
    weight_map: dict[str, str] = {}
    for shard, names in zip(SHARDS, (first, [n for n in tensors if n not in first])):
        save_file({n: tensors[n].contiguous() for n in names}, str(root / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8"
    )
    return root
