"""MistralTokenizer: the transformers tokenizer surface over sentencepiece, tokenizer.json or GGUF.

Backends (the ids are always the backend library's own):
- tokenizer.model: the sentencepiece library. Mistral's byte-fallback BPE gives exactly
  sentencepiece's ids, bos first. As in sentencepiece, text is never parsed for special tokens:
  "</s>" in a prompt is four characters, not eos.
- tokenizer.json: the `tokenizers` library. Added tokens in text match whole, as in transformers.
- .gguf: the vocabulary embedded in the file (see gguf_vocab.py); "llama" vocabularies run through
  sentencepiece, "gpt2" ones through `tokenizers`.

bos/eos are added by this class from add_bos_token / add_eos_token, never by a backend's own
post-processor, so every backend follows the same settings.

Chat: a chat template from tokenizer_config.json, chat_template.jinja or the GGUF metadata is
rendered with jinja2 in a sandbox, as transformers does. Without one, conversations use the
Mistral Instruct v0.1 format exactly as mistral-common's v1 instruct tokenizer encodes them.
"""
import functools
import json
import numbers
import os
import re
from datetime import datetime
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import sentencepiece
import torch
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, processors

from .gguf_vocab import (byte_level_tokenizer_from_gguf, bytes_to_unicode, read_gguf_metadata,
                         sentencepiece_model_from_gguf)

VERY_LARGE_INTEGER = int(1e30)  # transformers' "no limit" model_max_length
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_SETTINGS = (*_SPECIAL_NAMES, "add_bos_token", "add_eos_token", "chat_template", "model_max_length",
             "padding_side", "truncation_side", "clean_up_tokenization_spaces")
_TYPED_SETTINGS = {"add_bos_token": bool, "add_eos_token": bool, "model_max_length": int, "padding_side": str,
                   "truncation_side": str, "clean_up_tokenization_spaces": bool}
_CHAT_ROLES = ("system", "user", "assistant", "tool")


class BatchEncoding(dict):
    """A dict of model inputs (input_ids, attention_mask) that also allows attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> "BatchEncoding":
        """Moves every tensor to `device` (in place, like transformers) and returns self."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self


# ------------------------------------------------------------------------------------ helpers


def _read_text(path: str) -> str:
    with open(path, "rb") as file:
        raw = file.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: invalid UTF-8 at byte {error.start}") from None


def _read_json(path: str) -> dict:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_text(value, source: str) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{source}: a special token must be a string, got {value!r}")
    return value


def _settings_from_config(config: dict, source: str) -> Dict[str, Any]:
    settings = {name: _token_text(config[name], source) for name in _SPECIAL_NAMES if name in config}
    for name, kind in _TYPED_SETTINGS.items():
        if config.get(name) is not None:
            if not isinstance(config[name], kind):
                raise ValueError(f"{source}: {name} must be {kind.__name__}, got {config[name]!r}")
            settings[name] = config[name]
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the one named "default" is the chat template
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    if template is not None:
        if not isinstance(template, str):
            raise ValueError(f"{source}: chat_template must be a string")
        settings["chat_template"] = template
    return settings


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"text is not valid Unicode: lone surrogate {text[error.start]!r} "
                         f"at index {error.start}") from None
    return text


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: drops the space before punctuation and contractions."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                           (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


def _id_list(ids) -> List[int]:
    if hasattr(ids, "tolist"):  # tensors, numpy arrays and scalars
        ids = ids.tolist()
    if isinstance(ids, numbers.Integral):
        ids = [ids]
    if not isinstance(ids, (list, tuple)) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        raise TypeError("token ids must be an int, a sequence of ints or a 1-d tensor")
    return [int(i) for i in ids]


def _alternation(strings) -> Optional["re.Pattern"]:
    """A regex matching any of `strings`, longest first (None for none)."""
    strings = sorted(set(strings), key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, strings)) + ")") if strings else None


# ------------------------------------------------------------------------------------ backends


class _SentencePieceVocab:
    """A sentencepiece model."""

    file_name = "tokenizer.model"

    def __init__(self, model_proto: bytes, source: str):
        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(model_proto)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"{source}: not a valid sentencepiece model ({error})") from None
        self.model_proto = model_proto
        self.size = self.base_size = self.processor.get_piece_size()
        self.special_ids = frozenset(i for i in range(self.size)
                                     if self.processor.is_control(i) or self.processor.is_unknown(i))
        self.special_pattern = _alternation(self.processor.id_to_piece(i) for i in self.special_ids)
        # Whether encoding prepends "▁" (add_dummy_prefix), which decoding strips from the text start.
        self.dummy_prefix = self.processor.encode("a", out_type=str)[0].startswith("▁")

    def default_settings(self) -> Dict[str, Any]:
        sp = self.processor
        ids = (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id())
        return {name: sp.id_to_piece(i) for name, i in zip(_SPECIAL_NAMES, ids) if i >= 0}

    def token_to_id(self, token: str) -> Optional[int]:
        token_id = self.processor.piece_to_id(token)
        return token_id if self.processor.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str:
        return self.processor.id_to_piece(token_id)

    def encode(self, text: str) -> List[int]:
        return self.processor.encode(text)

    def encode_with_special_tokens(self, text: str) -> List[int]:
        """Special-token strings become their ids; the text between them is encoded piece by piece."""
        if self.special_pattern is None:
            return self.encode(text)
        ids = []
        for i, part in enumerate(self.special_pattern.split(text)):
            if i % 2:
                ids.append(self.processor.piece_to_id(part))
            elif part:
                ids.extend(self.processor.encode(part))
        return ids

    def decode(self, ids: List[int], skip_special_tokens: bool) -> str:
        """sentencepiece's own decoding, with special tokens written out unless skipped.

        Removing the special-token strings from the result gives exactly sentencepiece's decode:
        only the first text piece loses its dummy-prefix space.
        """
        if skip_special_tokens:
            return self.processor.decode([i for i in ids if i not in self.special_ids])
        parts, run, text_started = [], [], False
        for token_id in [*ids, None]:
            if token_id is not None and token_id not in self.special_ids:
                run.append(token_id)
                continue
            if run:
                text = self.processor.decode(run)
                if text_started and self.dummy_prefix and self.processor.id_to_piece(run[0]).startswith("▁"):
                    text = " " + text
                parts.append(text)
                run, text_started = [], True
            if token_id is not None:
                parts.append(self.processor.id_to_piece(token_id))
        return "".join(parts)

    def save(self, directory: str, prefix: List[str], suffix: List[str]) -> str:
        path = os.path.join(directory, self.file_name)
        with open(path, "wb") as file:
            file.write(self.model_proto)
        return path


class _TokenizersVocab:
    """A `tokenizers` pipeline (tokenizer.json, or built from a GGUF byte-level vocabulary)."""

    file_name = "tokenizer.json"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.base_size = tokenizer.get_vocab_size(with_added_tokens=False)
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, token in added.items() if token.special)
        self.added_pattern = _alternation(token.content for token in added.values())
        # A byte-level vocabulary without a token for some byte (SmolLM2 has none for 0x04, 0x1D, ...)
        # silently drops every character holding that byte; we refuse such text instead.
        self.missing_bytes = []
        if isinstance(tokenizer.decoder, decoders.ByteLevel):
            vocab = tokenizer.get_vocab()
            self.missing_bytes = [bytes([b]) for b, char in bytes_to_unicode().items() if char not in vocab]

    def default_settings(self) -> Dict[str, Any]:
        """bos/eos and add_bos/eos_token as the file's post-processor adds them, unk as its model names it."""
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        full = self.tokenizer.encode("a").ids
        start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
        prefix, suffix = full[:start], full[start + len(plain):]
        settings = {"add_bos_token": bool(prefix), "add_eos_token": bool(suffix)}
        if prefix:
            settings["bos_token"] = self.id_to_token(prefix[0])
        if suffix:
            settings["eos_token"] = self.id_to_token(suffix[-1])
        unk = getattr(self.tokenizer.model, "unk_token", None)
        if unk is not None and self.token_to_id(unk) is not None:
            settings["unk_token"] = unk
        return settings

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id)

    def _check_encodable(self, text: str):
        raw = text.encode("utf-8")
        if not any(b in raw for b in self.missing_bytes):
            return
        # Added tokens match whole, so their characters need no byte tokens.
        matches = self.added_pattern.finditer(text) if self.added_pattern else ()
        inside_added = {i for match in matches for i in range(match.start(), match.end())}
        for index, char in enumerate(text):
            if index not in inside_added and any(b in char.encode("utf-8") for b in self.missing_bytes):
                raise ValueError(f"text holds {char!r} (U+{ord(char):04X}) at index {index}, which this "
                                 "vocabulary cannot encode: it has no token for one of its UTF-8 bytes")

    def encode(self, text: str) -> List[int]:
        if self.missing_bytes:
            self._check_encodable(text)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    encode_with_special_tokens = encode  # added tokens always match whole here

    def decode(self, ids: List[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, directory: str, prefix: List[str], suffix: List[str]) -> str:
        # The saved post-processor adds what this tokenizer adds, for readers that rely on it.
        tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join([*prefix, "$A", *suffix]),
            special_tokens=[(token, self.token_to_id(token)) for token in dict.fromkeys(prefix + suffix)])
        path = os.path.join(directory, self.file_name)
        tokenizer.save(path)
        return path


# ------------------------------------------------------------------------------------ loaders
# Each returns (vocabulary, settings); settings are MistralTokenizer keyword arguments.


def _load_sentencepiece(path: str):
    with open(path, "rb") as file:
        vocab = _SentencePieceVocab(file.read(), path)
    return vocab, vocab.default_settings()


def _load_tokenizer_json(path: str):
    text = _read_text(path)
    try:
        vocab = _TokenizersVocab(Tokenizer.from_str(text))
    except Exception as error:  # tokenizers raises its own exception type for malformed files
        raise ValueError(f"{path}: not a valid tokenizer.json ({error})") from None
    return vocab, vocab.default_settings()


def _load_gguf(path: str):
    metadata = read_gguf_metadata(path)
    model = metadata.get("tokenizer.ggml.model")
    if model == "llama":
        vocab = _SentencePieceVocab(sentencepiece_model_from_gguf(metadata, path), path)
    elif model == "gpt2":
        vocab = _TokenizersVocab(byte_level_tokenizer_from_gguf(metadata, path))
    else:
        raise ValueError(f"{path}: unsupported GGUF tokenizer model {model!r} (supported: 'llama', 'gpt2')")
    tokens = metadata["tokenizer.ggml.tokens"]
    settings = {}
    for name, key in zip(_SPECIAL_NAMES, ("bos", "eos", "unknown", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            if not 0 <= token_id < len(tokens):
                raise ValueError(f"{path}: tokenizer.ggml.{key}_token_id {token_id} is outside the vocabulary")
            settings[name] = tokens[token_id]
    # llama.cpp adds bos to a sentencepiece vocabulary unless the file says otherwise.
    settings["add_bos_token"] = metadata.get("tokenizer.ggml.add_bos_token", model == "llama")
    settings["add_eos_token"] = metadata.get("tokenizer.ggml.add_eos_token", False)
    if "tokenizer.chat_template" in metadata:
        settings["chat_template"] = metadata["tokenizer.chat_template"]
    return vocab, settings


def _load_directory(directory: str, gguf_file: Optional[str]):
    def file(name):
        path = os.path.join(directory, name)
        return path if os.path.isfile(path) else None

    model_file, json_file = file("tokenizer.model"), file("tokenizer.json")
    if gguf_file is not None or not (model_file or json_file):
        if gguf_file is None:
            ggufs = sorted(name for name in os.listdir(directory) if name.endswith(".gguf"))
            if not ggufs:
                raise FileNotFoundError(f"{directory}: no tokenizer.model, tokenizer.json or .gguf file found")
            if len(ggufs) > 1:
                raise ValueError(f"{directory}: several GGUF files ({', '.join(ggufs)}); pass gguf_file=NAME")
            gguf_file = ggufs[0]
        return _load_gguf(os.path.join(directory, gguf_file))

    vocab, settings = _load_sentencepiece(model_file) if model_file else (None, {})
    if json_file:
        json_vocab, json_settings = _load_tokenizer_json(json_file)
        if vocab is None or json_vocab.size > vocab.size:  # it wins over sentencepiece only by adding tokens
            vocab, settings = json_vocab, json_settings
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files take precedence
        if file(name):
            settings.update(_settings_from_config(_read_json(file(name)), file(name)))
    if file("chat_template.jinja"):
        settings["chat_template"] = _read_text(file("chat_template.jinja"))
    return vocab, settings


@functools.lru_cache(maxsize=8)
def _compile_chat_template(source: str):
    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return environment.from_string(source)
    except TemplateError as error:
        raise ValueError(f"invalid chat template: {error}") from None


def _special_token(name: str):
    return property(lambda self: self._special[name], lambda self, token: self._set_special(name, token))


class MistralTokenizer:
    """Tokenizer with transformers' API: encode/decode, __call__ with padding, chat templates.

    Defaults: padding_side "left" (what batched generation needs), truncation_side "right",
    add_bos_token True and add_eos_token False unless the files say otherwise. pad_token and
    pad_token_id fall back to the eos token, then the unk token, when the files define no pad
    token (Mistral defines none); padded positions get attention_mask 0, so the value is never
    attended to.
    """

    def __init__(self, vocab, *, bos_token: Optional[str] = None, eos_token: Optional[str] = None,
                 unk_token: Optional[str] = None, pad_token: Optional[str] = None, add_bos_token: bool = True,
                 add_eos_token: bool = False, chat_template: Optional[str] = None,
                 model_max_length: int = VERY_LARGE_INTEGER, padding_side: str = "left",
                 truncation_side: str = "right", clean_up_tokenization_spaces: bool = False,
                 name_or_path: str = ""):
        self._vocab = vocab
        self._special = {}
        for name, token in zip(_SPECIAL_NAMES, (bos_token, eos_token, unk_token, pad_token)):
            self._set_special(name, token)
        self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.name_or_path = name_or_path

    # -------------------------------------------------------------------------------- loading, saving

    @classmethod
    def from_pretrained(cls, path, *, gguf_file: Optional[str] = None, **kwargs) -> "MistralTokenizer":
        """Loads a directory (tokenizer.model and/or tokenizer.json, with tokenizer_config.json,
        special_tokens_map.json, chat_template.jinja when present; or a single .gguf, or gguf_file=),
        a sentencepiece .model file, a tokenizer.json file or a .gguf file.
        Keyword arguments (bos_token, add_bos_token, padding_side, ...) override the files.
        """
        unknown = sorted(set(kwargs) - set(_SETTINGS))
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword arguments: {', '.join(unknown)}")
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or directory (tokenizers load local files only)")
        if gguf_file is not None and not os.path.isdir(path):
            raise ValueError(f"gguf_file={gguf_file!r} needs a directory, but {path} is a file")
        if os.path.isdir(path):
            vocab, settings = _load_directory(path, gguf_file)
        elif path.endswith(".gguf"):
            vocab, settings = _load_gguf(path)
        elif path.endswith(".json"):
            vocab, settings = _load_tokenizer_json(path)
        else:
            vocab, settings = _load_sentencepiece(path)
        try:
            return cls(vocab, name_or_path=path, **{**settings, **kwargs})
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def save_pretrained(self, directory) -> Tuple[str, ...]:
        """Writes tokenizer.model or tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        special = {name: token for name, token in self._special.items() if token is not None}
        prefix, suffix = self._special_prefix_suffix()
        paths = [self._vocab.save(directory, self.convert_ids_to_tokens(prefix),
                                  self.convert_ids_to_tokens(suffix))]
        sentencepiece_based = isinstance(self._vocab, _SentencePieceVocab)
        config = {"tokenizer_class": "LlamaTokenizer" if sentencepiece_based else "PreTrainedTokenizerFast",
                  **special, "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
                  "model_max_length": self.model_max_length, "padding_side": self.padding_side,
                  "truncation_side": self.truncation_side,
                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
            paths.append(os.path.join(directory, name))
            with open(paths[-1], "w", encoding="utf-8") as file:
                json.dump(content, file, indent=2, ensure_ascii=False)
                file.write("\n")
        return tuple(paths)

    # -------------------------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (without tokens added on top of it)."""
        return self._vocab.base_size

    def __len__(self) -> int:
        return self._vocab.size

    def get_vocab(self) -> Dict[str, int]:
        return {self._vocab.id_to_token(i): i for i in range(len(self))}

    def _set_special(self, name: str, token: Optional[str]):
        if token is not None and (not isinstance(token, str) or self._vocab.token_to_id(token) is None):
            raise ValueError(f"{name} {token!r} is not in the vocabulary")
        self._special[name] = token

    def _token_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._vocab.token_to_id(token)

    bos_token = _special_token("bos_token")
    eos_token = _special_token("eos_token")
    unk_token = _special_token("unk_token")

    @property
    def pad_token(self) -> Optional[str]:
        """The pad token of the files, else the eos token, else the unk token."""
        return next((t for t in (self._special["pad_token"], self.eos_token, self.unk_token) if t), None)

    @pad_token.setter
    def pad_token(self, token: Optional[str]):
        self._set_special("pad_token", token)

    bos_token_id = property(lambda self: self._token_id(self.bos_token))
    eos_token_id = property(lambda self: self._token_id(self.eos_token))
    unk_token_id = property(lambda self: self._token_id(self.unk_token))
    pad_token_id = property(lambda self: self._token_id(self.pad_token), doc="The id of pad_token.")

    @property
    def all_special_ids(self) -> List[int]:
        """Ids that decode(skip_special_tokens=True) drops: control, unknown and special added tokens."""
        return sorted(self._vocab.special_ids)

    @property
    def all_special_tokens(self) -> List[str]:
        return self.convert_ids_to_tokens(self.all_special_ids)

    def _check_ids(self, ids) -> List[int]:
        ids = _id_list(ids)
        bad = next((i for i in ids if not 0 <= i < len(self)), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {len(self)} tokens")
        return ids

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """Token strings of ids (one string for one int or a 0-d tensor)."""
        single = isinstance(ids, numbers.Integral) or (isinstance(ids, torch.Tensor) and ids.dim() == 0)
        tokens = [self._vocab.id_to_token(i) for i in self._check_ids(ids)
                  if not (skip_special_tokens and i in self._vocab.special_ids)]
        return tokens[0] if single else tokens

    def convert_tokens_to_ids(self, tokens):
        """Ids of tokens (one id for one string); a token outside the vocabulary maps to unk_token_id."""
        if isinstance(tokens, str):
            token_id = self._vocab.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    # -------------------------------------------------------------------------------- encoding

    def _special_prefix_suffix(self) -> Tuple[List[int], List[int]]:
        prefix = [self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None else []
        suffix = [self.eos_token_id] if self.add_eos_token and self.eos_token_id is not None else []
        return prefix, suffix

    def tokenize(self, text: str) -> List[str]:
        """The token strings of `text` (no special tokens added)."""
        return self.convert_ids_to_tokens(self._vocab.encode(_check_text(text)))

    def _encode_one(self, text: str, add_special_tokens: bool, max_length: Optional[int]) -> List[int]:
        ids = self._vocab.encode(_check_text(text))
        prefix, suffix = self._special_prefix_suffix() if add_special_tokens else ([], [])
        if max_length is not None:
            keep = max_length - len(prefix) - len(suffix)
            if keep < 0:
                raise ValueError(f"max_length={max_length} leaves no room for the "
                                 f"{len(prefix) + len(suffix)} special tokens")
            if len(ids) > keep:
                ids = ids[:keep] if self.truncation_side == "right" else ids[len(ids) - keep:]
        return prefix + ids + suffix

    def _truncation_length(self, truncation, max_length: Optional[int]) -> Optional[int]:
        if truncation in (False, None, "do_not_truncate"):
            return None
        if truncation not in (True, "longest_first", "only_first"):
            raise ValueError(f"unknown truncation strategy {truncation!r}")
        length = max_length if max_length is not None else self.model_max_length
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"max_length must be a non-negative int, got {length!r}")
        return length

    @staticmethod
    def _as_tensor(rows: List[List[int]], return_tensors: Optional[str]):
        if return_tensors is None:
            return rows
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (use 'pt' or None)")
        if len({len(row) for row in rows}) > 1:
            raise ValueError("sequences have different lengths; pass padding=True to batch them as a tensor")
        return torch.tensor(rows, dtype=torch.long)

    def encode(self, text: str, add_special_tokens: bool = True, truncation=False,
               max_length: Optional[int] = None, return_tensors: Optional[str] = None):
        """Token ids of `text`: [bos] + ids (+ [eos]) as add_bos_token / add_eos_token say.
        return_tensors="pt" gives a [1, n] tensor."""
        ids = self._encode_one(text, add_special_tokens, self._truncation_length(truncation, max_length))
        return ids if return_tensors is None else self._as_tensor([ids], return_tensors)

    def _padding_length(self, padding, max_length: Optional[int], rows: List[List[int]]) -> Optional[int]:
        if padding in (False, None, "do_not_pad"):
            return None
        if padding in (True, "longest"):
            return max(len(row) for row in rows)
        if padding == "max_length":
            length = max_length if max_length is not None else self.model_max_length
            if length >= VERY_LARGE_INTEGER:
                raise ValueError("padding='max_length' needs max_length")
            return length
        raise ValueError(f"unknown padding strategy {padding!r}")

    def __call__(self, text: Union[str, Sequence[str]], padding=False, truncation=False,
                 max_length: Optional[int] = None, return_tensors: Optional[str] = None,
                 add_special_tokens: bool = True, padding_side: Optional[str] = None,
                 return_attention_mask: bool = True) -> BatchEncoding:
        """Encodes one text or a batch into input_ids and attention_mask.

        padding: False / "do_not_pad", True / "longest" (to the longest of the batch), or
        "max_length" (to max_length), on padding_side (default self.padding_side, "left").
        truncation: True / "longest_first" / "only_first" cut each text to max_length tokens,
        special tokens included, on self.truncation_side.
        """
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, (list, tuple)) or not texts:
            raise TypeError("text must be a str or a non-empty list of str")
        limit = self._truncation_length(truncation, max_length)
        rows = [self._encode_one(t, add_special_tokens, limit) for t in texts]
        masks = [[1] * len(row) for row in rows]
        target = self._padding_length(padding, max_length, rows)
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if target is not None and any(len(row) < target for row in rows):
            if self.pad_token_id is None:
                raise ValueError("no pad, eos or unk token to pad with; set tokenizer.pad_token")
            for i, row in enumerate(rows):
                pads, zeros = [self.pad_token_id] * (target - len(row)), [0] * (target - len(row))
                if side == "left":
                    rows[i], masks[i] = pads + row, zeros + masks[i]
                else:
                    rows[i], masks[i] = row + pads, masks[i] + zeros

        encoding = BatchEncoding(input_ids=rows)
        if return_attention_mask:
            encoding["attention_mask"] = masks
        for key, value in encoding.items():
            if single and return_tensors is None:
                encoding[key] = value[0]
            else:
                encoding[key] = self._as_tensor(value, return_tensors)
        return encoding

    # -------------------------------------------------------------------------------- decoding

    def decode(self, ids, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: Optional[bool] = None) -> str:
        """Text of `ids` (an int, a sequence or a 1-d tensor). Special tokens appear as their
        strings unless skip_special_tokens."""
        if isinstance(ids, torch.Tensor) and ids.dim() > 1:
            raise ValueError(f"decode takes one sequence; use batch_decode for a {ids.dim()}-d tensor")
        text = self._vocab.decode(self._check_ids(ids), skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return _clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: Optional[bool] = None) -> List[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in sequences]

    # -------------------------------------------------------------------------------- chat

    def apply_chat_template(self, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = True, return_tensors: Optional[str] = None,
                            chat_template: Optional[str] = None, **template_variables):
        """Formats a conversation ([{"role": ..., "content": ...}, ...]) for the model.

        With a chat template (the argument, else the files') the template is rendered with jinja2
        (messages, add_generation_prompt, bos_token, eos_token, ... and template_variables) and
        its text tokenized with special-token strings matched whole. Without one, the Mistral
        Instruct v0.1 format (see _mistral_instruct_ids). tokenize=False returns the text;
        return_tensors="pt" a [1, n] tensor.
        """
        messages = self._check_messages(messages)
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            ids = self._mistral_instruct_ids(messages, add_generation_prompt)
            if not tokenize:
                return self.decode(ids)
        else:
            variables = {"messages": messages, "add_generation_prompt": add_generation_prompt,
                         "tools": None, "documents": None,
                         **{name: getattr(self, name) for name in _SPECIAL_NAMES}, **template_variables}
            try:
                text = _compile_chat_template(template).render(**variables)
            except TemplateError as error:  # raise_exception() in the template, or a sandbox violation
                raise ValueError(f"chat template rejected the conversation: {error}") from None
            if not tokenize:
                return text
            ids = self._vocab.encode_with_special_tokens(text)
        return ids if return_tensors is None else self._as_tensor([ids], return_tensors)

    @staticmethod
    def _check_messages(messages) -> List[Dict[str, Any]]:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', "
                                 f"got {type(message).__name__}")
            if message.get("role") not in _CHAT_ROLES:
                raise ValueError(f"message {i} has unknown role {message.get('role')!r} "
                                 f"(known: {', '.join(_CHAT_ROLES)})")
            if not isinstance(message.get("content"), str):
                raise ValueError(f"message {i} ({message['role']}) content must be a str, "
                                 f"got {type(message.get('content')).__name__}")
            _check_text(message["content"])
        return list(messages)

    def _mistral_instruct_ids(self, messages: List[Dict[str, str]], add_generation_prompt: bool) -> List[int]:
        """Mistral Instruct v0.1, token for token as mistral-common's v1 instruct tokenizer:
        bos, then each user turn encoded as "[INST] {content} [/INST]", each assistant answer
        encoded and followed by eos. System messages are joined (by blank lines) and put in front
        of the first user message; consecutive messages of one role merge the same way.

        Accepted and rejected like mistral-common: no tool messages, a lone message must come from
        the user or the system, no system message right after an assistant one, no empty
        assistant answer. With add_generation_prompt (the model answers next) the conversation
        cannot end with an answer; without, it may (a finished conversation).
        """
        roles = [m["role"] for m in messages]
        if "tool" in roles:
            raise ValueError("the Mistral Instruct v0.1 format has no tool messages")
        if roles == ["assistant"]:
            raise ValueError("a conversation must start with a user or system message")
        if any(previous == "assistant" and role == "system" for previous, role in zip(roles, roles[1:])):
            raise ValueError("a system message cannot follow an assistant message")
        if any(m["role"] == "assistant" and not m["content"] for m in messages):
            raise ValueError("an assistant message must have content")
        if add_generation_prompt and roles[-1] == "assistant":
            raise ValueError("the conversation ends with an assistant message, so the model has nothing to "
                             "answer; pass add_generation_prompt=False to encode a finished conversation")
        if self.bos_token_id is None or self.eos_token_id is None:
            raise ValueError("the Mistral Instruct format needs bos and eos tokens, which this tokenizer lacks "
                             "(pass chat_template= to use another format)")

        def join(contents):
            return "\n\n".join(c for c in contents if c)

        system_prompt = join(m["content"] for m in messages if m["role"] == "system")
        turns = []  # [role, contents]: runs of one role; a system message ends a run
        for previous, message in zip([None, *roles], messages):
            if message["role"] == "system":
                continue
            if message["role"] == previous:
                turns[-1][1].append(message["content"])
            else:
                turns.append([message["role"], [message["content"]]])
        if not turns or turns[0][0] != "user":
            turns.insert(0, ["user", [""]])

        ids = [self.bos_token_id]
        for i, (role, contents) in enumerate(turns):
            content = join(contents)
            if role == "user":
                if i == 0 and system_prompt:
                    content = system_prompt + "\n\n" + content
                ids += self._vocab.encode(f"[INST] {content} [/INST]")
            else:
                ids += self._vocab.encode(content) + [self.eos_token_id]
        return ids

    def __repr__(self) -> str:
        return (f"MistralTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"backend={self._vocab.file_name}, padding_side={self.padding_side!r})")
