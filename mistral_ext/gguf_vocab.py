"""Tokenizers embedded in GGUF files.

A GGUF stores its vocabulary as llama.cpp metadata (tokenizer.ggml.*), not as a tokenizer file.
Two kinds matter here:
- "llama": a sentencepiece vocabulary (pieces, scores, token types). llama.cpp encodes it with
  sentencepiece's BPE algorithm (merge the best-scoring adjacent pair first, bytes as fallback),
  so we rebuild the sentencepiece model file itself and let the sentencepiece library run it.
- "gpt2": byte-level BPE (pieces spelled in GPT-2's byte alphabet, plus a merge list), split
  beforehand by the regexes that tokenizer.ggml.pre names. Built as a `tokenizers` pipeline.

The metadata comes from gguf_file.py's header reader (read_gguf_metadata).
"""
import struct
from typing import Any, Dict, List

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .gguf_file import read_gguf_metadata  # noqa: F401 (the tokenizer reads GGUF metadata from here)

# llama.cpp token types (the same numbers as sentencepiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte alphabet: every byte as a printable character (printable bytes as themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _protobuf_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 fields are written as 64-bit two's complement
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _pb_int(field: int, value: int) -> bytes:
    return _protobuf_varint(field << 3) + _protobuf_varint(value)


def _pb_bytes(field: int, data: bytes) -> bytes:
    return _protobuf_varint(field << 3 | 2) + _protobuf_varint(len(data)) + data


def _pb_float(field: int, value: float) -> bytes:
    return _protobuf_varint(field << 3 | 5) + struct.pack("<f", value)


def _token_list(metadata: Dict[str, Any], path: str) -> List[str]:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path}: GGUF file has no tokenizer.ggml.tokens")
    return tokens


def _per_token(metadata: Dict[str, Any], key: str, count: int, default, path: str) -> list:
    values = metadata.get(key)
    if values is None:
        return [default] * count
    if len(values) != count:
        raise ValueError(f"{path}: {key} has {len(values)} entries for {count} tokens")
    return values


def sentencepiece_model_from_gguf(metadata: Dict[str, Any], path: str) -> bytes:
    """A serialized sentencepiece ModelProto equivalent to a "llama" GGUF vocabulary."""
    tokens = _token_list(metadata, path)
    scores = _per_token(metadata, "tokenizer.ggml.scores", len(tokens), 0.0, path)
    types = _per_token(metadata, "tokenizer.ggml.token_type", len(tokens), NORMAL, path)
    ids = {name: metadata.get(f"tokenizer.ggml.{name}_token_id", -1)
           for name in ("unknown", "bos", "eos", "padding")}
    ids["unknown"] = 0 if ids["unknown"] < 0 else ids["unknown"]
    for name, token_id in ids.items():
        if token_id >= len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{name}_token_id {token_id} is outside the "
                             f"{len(tokens)}-token vocabulary")
    types = [UNKNOWN if i == ids["unknown"] else (t if NORMAL <= t <= BYTE else NORMAL)
             for i, t in enumerate(types)]
    pieces = b"".join(
        _pb_bytes(1, _pb_bytes(1, token.encode("utf-8")) + _pb_float(2, score) + _pb_int(3, kind))
        for token, score, kind in zip(tokens, scores, types))
    byte_pieces = {f"<0x{b:02X}>" for b in range(256)}
    byte_fallback = byte_pieces <= {t for t, kind in zip(tokens, types) if kind == BYTE}
    trainer = (_pb_int(3, 2)  # model_type BPE: llama.cpp's SPM tokenizer is sentencepiece BPE
               + _pb_int(4, len(tokens)) + _pb_int(35, byte_fallback)
               + _pb_int(40, ids["unknown"]) + _pb_int(41, ids["bos"])
               + _pb_int(42, ids["eos"]) + _pb_int(43, ids["padding"]))
    for field, name in zip((45, 46, 47, 48), ("unknown", "bos", "eos", "padding")):
        if ids[name] >= 0:
            trainer += _pb_bytes(field, tokens[ids[name]].encode("utf-8"))
    normalizer = (_pb_bytes(1, b"identity")
                  + _pb_int(3, metadata.get("tokenizer.ggml.add_space_prefix", True))
                  + _pb_int(4, False) + _pb_int(5, True))
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


# The regexes that split text before byte-level BPE, by tokenizer.ggml.pre (llama.cpp's names).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp splits these first at every numeric character, then with GPT-2's regex (the same as
# a tokenizer.json with Digits(individual_digits=True) before ByteLevel, e.g. SmolLM2's own).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_SPLITS = {
    **dict.fromkeys(("gpt2", "gpt-2", "default"), _GPT2_SPLIT),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}


def _byte_level_pre_tokenizer(name: str, path: str):
    if name in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if name not in _SPLITS:
        known = sorted([*_SPLITS, *_DIGITS_THEN_GPT2])
        raise ValueError(f"{path}: unsupported pre-tokenizer tokenizer.ggml.pre={name!r} (supported: {known})")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[name]), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def byte_level_tokenizer_from_gguf(metadata: Dict[str, Any], path: str) -> Tokenizer:
    """A `tokenizers` pipeline equivalent to a "gpt2" GGUF vocabulary (byte-level BPE)."""
    tokens = _token_list(metadata, path)
    types = _per_token(metadata, "tokenizer.ggml.token_type", len(tokens), NORMAL, path)
    alphabet = bytes_to_unicode()
    spelled = set(alphabet.values())
    # Tokens are stored in the byte alphabet, except some special ones written as plain text.
    vocab = {token if set(token) <= spelled else "".join(alphabet[b] for b in token.encode("utf-8")): i
             for i, token in enumerate(tokens)}
    merges = []
    for merge in metadata.get("tokenizer.ggml.merges", []):
        pair = tuple(merge.split(" "))
        if len(pair) != 2:
            raise ValueError(f"{path}: malformed merge {merge!r} in tokenizer.ggml.merges")
        merges.append(pair)
    tokenizer = Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "gpt2"), path)
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens match whole in text and are special; a control token outside the byte alphabet
    # is a mislabelled one that the model never sees whole, so it stays an ordinary vocabulary entry.
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, kind in zip(tokens, types) if kind == CONTROL and set(t) <= spelled])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                          for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab])
    return tokenizer
