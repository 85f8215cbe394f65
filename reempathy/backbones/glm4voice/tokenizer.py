"""GLM-4's tiktoken vocabulary → a ``tokenizers`` byte-level BPE fast tokenizer, no remote code.

The published ``tokenization_chatglm.py`` reads ``tokenizer.model`` (one ``base64(token) rank``
per line), builds a ``tiktoken.Encoding`` with the cl100k-style pattern below and registers
fourteen fixed special tokens at ids ``len(ranks), len(ranks)+1, …``; the audio and other
added tokens come from ``added_tokens_decoder`` in ``tokenizer_config.json``. It prefixes
``[gMASK]<sop>`` whenever special tokens are added (``build_inputs_with_special_tokens``),
i.e. on a plain ``tokenizer(text)`` call.

Here the same vocabulary becomes a ``tokenizers`` BPE model: every rank is a vocabulary entry
(bytes written in the GPT-2 byte-to-unicode alphabet), every way of splitting a token into two
tokens is a merge ordered by the token's rank, and ``ignore_merges`` looks a whole
pre-tokenized piece up first, as tiktoken does. Added tokens keep the ids the checkpoint
declares, gaps included: they are also entered in the model vocabulary, because ``tokenizers``
renumbers an added token that the model does not know when a ``tokenizer.json`` is reloaded.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from reempathy.errors import CheckpointError

# The pre-tokenization pattern of the published ChatGLM4Tokenizer (tiktoken's cl100k pattern).
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Registered by the published tokenizer's code at len(ranks) onwards, whether or not
# tokenizer_config.json lists them.
FIXED_SPECIALS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip
PREFIX_TOKENS = ("[gMASK]", "<sop>")
EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class AddedSpec:
    """One added token: its text, its id and whether it is special (skipped by ``skip_special_tokens``)."""

    content: str
    id: int
    special: bool


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte → printable character table that ``tokenizers``' ByteLevel uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHARS = _bytes_to_unicode()


def byte_level(token: bytes) -> str:
    """``token`` in the byte-level alphabet of the BPE vocabulary."""
    return "".join(_BYTE_CHARS[b] for b in token)


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Token bytes → rank from a tiktoken file (``base64 rank`` per line)."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the GLM-4 tokenizer vocabulary (tiktoken format) is required")
    ranks: dict[bytes, int] = {}
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token_b64, rank_text = line.split()
                token = base64.b64decode(token_b64, validate=True)
                rank = int(rank_text)
            except (ValueError, binascii.Error):
                raise CheckpointError(
                    f"{path} line {number} is not 'base64-token rank'; the file is not a tiktoken vocabulary"
                ) from None
            if token in ranks:
                raise CheckpointError(f"{path} line {number} repeats a token; the vocabulary is corrupt")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps; the vocabulary is corrupt")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} single-byte tokens; it is not a byte-level BPE vocabulary")
    return ranks


def read_added_tokens(config_path: Path, text_end: int) -> list[AddedSpec]:
    """Added tokens of the published tokenizer: the fixed specials plus ``added_tokens_decoder``, ids as declared."""
    declared: dict[int, AddedSpec] = {}
    if config_path.is_file():
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
            entries = raw.get("added_tokens_decoder", {}) or {}
            for key, entry in entries.items():
                declared[int(key)] = AddedSpec(str(entry["content"]), int(key), bool(entry.get("special", True)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{config_path} cannot be read ({e}); its added_tokens_decoder must map ids to {{'content': ...}}"
            ) from None
    by_content = {spec.content: spec for spec in declared.values()}
    for offset, content in enumerate(FIXED_SPECIALS):
        if content not in by_content:
            token_id = text_end + offset
            if token_id in declared:
                raise CheckpointError(
                    f"{config_path} gives id {token_id} to {declared[token_id].content!r}, but the GLM-4 tokenizer "
                    f"reserves it for {content!r}; the tokenizer config does not match tokenizer.model"
                )
            spec = AddedSpec(content, token_id, True)
            declared[token_id] = spec
            by_content[content] = spec
    if len(by_content) != len(declared):
        raise CheckpointError(f"{config_path} declares the same token under two ids; the tokenizer config is corrupt")
    low = [s for s in declared.values() if s.id < text_end]
    if low:
        raise CheckpointError(
            f"{config_path} gives {low[0].content!r} id {low[0].id}, inside the text vocabulary "
            f"(ids below {text_end}); the tokenizer config does not match tokenizer.model"
        )
    return sorted(declared.values(), key=lambda s: s.id)


def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges equivalent to tiktoken's rank-driven merging."""
    vocab = {byte_level(token): rank for token, rank in ranks.items()}
    ordered: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                ordered.append((rank, left_rank, right_rank, byte_level(left), byte_level(right)))
    ordered.sort()
    return vocab, [(left, right) for _, _, _, left, right in ordered]


def build_backend(ranks: dict[bytes, int], added: Iterable[AddedSpec]) -> Tokenizer:
    """The ``tokenizers`` object: BPE over the ranks, GLM-4 pre-tokenization, added tokens at their ids."""
    added = list(added)
    vocab, merges = bpe_vocab_and_merges(ranks)
    for spec in added:
        vocab[spec.content] = spec.id
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(
        [AddedToken(s.content, special=s.special, normalized=False, lstrip=False, rstrip=False) for s in added]
    )
    _check_ids(backend, added, "the built tokenizer")
    set_prefix_processor(backend)
    return backend


def set_prefix_processor(backend: Tokenizer) -> None:
    """Prefix ``[gMASK]<sop>`` when special tokens are added, as the published tokenizer does."""
    ids = [(t, backend.token_to_id(t)) for t in PREFIX_TOKENS]
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(f"{t}:0" for t in PREFIX_TOKENS) + " $A:0",
        pair=" ".join(f"{t}:0" for t in PREFIX_TOKENS) + " $A:0 $B:1",
        special_tokens=ids,
    )


def with_added_tokens(backend: Tokenizer, specs: Iterable[AddedSpec]) -> Tokenizer:
    """A copy of a BPE ``backend`` with more added tokens at fixed ids (entered in the model vocabulary too)."""
    specs = list(specs)
    data = json.loads(backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError("the checkpoint's tokenizer.json is not a BPE tokenizer; cannot add tokens at fixed ids")
    for spec in specs:
        model["vocab"][spec.content] = spec.id
        data.setdefault("added_tokens", []).append(
            {
                "id": spec.id,
                "content": spec.content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": spec.special,
            }
        )
    grown = Tokenizer.from_str(json.dumps(data))
    _check_ids(grown, specs, "the tokenizer")
    return grown


def _check_ids(backend: Tokenizer, specs: Iterable[AddedSpec], where: str) -> None:
    for spec in specs:
        got = backend.token_to_id(spec.content)
        if got != spec.id:
            raise CheckpointError(f"{where} gives {spec.content!r} id {got}, not the declared {spec.id}")


def wrap(backend: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """The transformers tokenizer around ``backend`` (left padding, ``<|endoftext|>`` as eos and pad)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def encode_plain(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Ids of ``text`` as ordinary text: control-token strings inside it are not turned into control tokens.

    This is tiktoken's ``encode_ordinary``: pre-tokenize, then BPE each piece, skipping the
    added-token matcher, so user text cannot inject ``<|user|>`` or audio tokens.
    """
    backend = tokenizer.backend_tokenizer
    ids: list[int] = []
    for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text):
        ids.extend(token.id for token in backend.model.tokenize(piece))
    return ids
