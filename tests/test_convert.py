"""`mistral-ext convert`: raw Mistral directory -> transformers directory.

The raw checkpoint is made from a random transformers model by the inverse of the documented
q/k permutation (tests/test_loading.py's helpers); transformers itself must load the converted
directory to the original tensors. The tokenizer is Mistral-7B's real sentencepiece model,
shipped by mistral-common.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import sentencepiece
import torch
import transformers

from mistral_ext import MistralTokenizer, cli, convert
from mistral_ext.loading import CheckpointError
from test_loading import assert_same_logits, assert_same_tensors, random_hf_model, write_raw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISTRAL_TOKENIZER = os.path.join(list(importlib.util.find_spec("mistral_common").submodule_search_locations)[0],
                                 "data", "tokenizer.model.v1")
TEXT = "Hello world, it's 2026! Ça va? 🙂"


def raw_with_tokenizer(directory, hf, layout="pth", tokenizer_name="tokenizer.model"):
    write_raw(directory, hf, layout)
    with open(MISTRAL_TOKENIZER, "rb") as src, open(os.path.join(directory, tokenizer_name), "wb") as dst:
        dst.write(src.read())
    return str(directory)


def run_convert(*argv):
    return cli.main(["convert", *argv])


def test_convert_seed_command_line(tmp_path):
    """The seed's spelling through the mistral-ext entry point; transformers loads the result."""
    hf = random_hf_model(seed=21)
    raw = raw_with_tokenizer(tmp_path / "raw", hf)
    out = tmp_path / "out"
    assert run_convert("--input_dir", raw, "--model_size", "7B", "--output_dir", str(out)) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                       "tokenizer.model", "tokenizer_config.json"]
    peer = transformers.MistralForCausalLM.from_pretrained(out).eval()
    assert peer.config.sliding_window == 5 and peer.config.num_key_value_heads == 2
    assert peer.config.architectures == ["MistralForCausalLM"]
    assert_same_tensors(peer, hf)
    assert_same_logits(peer, hf)

    with open(out / "tokenizer.model", "rb") as a, open(MISTRAL_TOKENIZER, "rb") as b:
        assert a.read() == b.read()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["bos_token"] == "<s>"
    expected = [1] + sentencepiece.SentencePieceProcessor(model_file=MISTRAL_TOKENIZER).encode(TEXT)
    assert MistralTokenizer.from_pretrained(out)(TEXT).input_ids == expected


def test_converted_tokenizer_loads_in_transformers(tmp_path):
    # transformers turns tokenizer.model into its tokenizers backend through protobuf.
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read tokenizer.model")
    raw = raw_with_tokenizer(tmp_path / "raw", random_hf_model())
    convert.main(["--input_dir", raw, "--model_size", "tokenizer_only", "--output_dir", str(tmp_path / "out")])
    tokenizer = transformers.LlamaTokenizer.from_pretrained(tmp_path / "out")
    expected = [1] + sentencepiece.SentencePieceProcessor(model_file=MISTRAL_TOKENIZER).encode(TEXT)
    assert tokenizer(TEXT).input_ids == expected


def test_python_module_dashed_spelling_sharded(tmp_path):
    """python -m mistral_ext.convert with --input-dir/--output-dir, tensor-parallel raw shards,
    a versioned tokenizer file name and sharded output."""
    hf = random_hf_model(seed=22)
    raw = raw_with_tokenizer(tmp_path / "raw", hf, "pth_2_shards", tokenizer_name="tokenizer.model.v3")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "mistral_ext.convert", "--input-dir", raw, "--output-dir",
                             str(out), "--max-shard-size", "40KB"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "copied tokenizer.model.v3 as tokenizer.model" in result.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    peer = transformers.MistralForCausalLM.from_pretrained(out)
    assert_same_tensors(peer, hf)


def test_tokenizer_only_and_no_tokenizer(tmp_path, capsys):
    hf = random_hf_model(seed=23)
    raw = raw_with_tokenizer(tmp_path / "raw", hf)
    assert convert.main(["--input_dir", raw, "--model_size", "tokenizer_only", "--output_dir",
                         str(tmp_path / "tok")]) == 0
    assert sorted(os.listdir(tmp_path / "tok")) == ["special_tokens_map.json", "tokenizer.model",
                                                    "tokenizer_config.json"]
    bare = write_raw(tmp_path / "bare", hf, "safetensors")
    assert convert.main(["--input_dir", str(bare), "--output_dir", str(tmp_path / "bare_out")]) == 0
    assert "tokenizer not converted" in capsys.readouterr().out
    assert_same_tensors(transformers.MistralForCausalLM.from_pretrained(tmp_path / "bare_out"), hf)


def test_convert_errors(tmp_path, capsys):
    assert convert.main(["--input_dir", str(tmp_path / "absent"), "--output_dir", str(tmp_path / "o")]) == 1
    assert "absent: not a directory" in capsys.readouterr().err
    raw = str(write_raw(tmp_path / "raw", random_hf_model(seed=24), "pth"))
    state = torch.load(os.path.join(raw, "consolidated.00.pth"))
    del state["layers.1.feed_forward.w3.weight"]
    torch.save(state, os.path.join(raw, "consolidated.00.pth"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        convert.convert(raw, str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o" / "model.safetensors")
    assert run_convert("--input_dir", raw, "--output_dir", str(tmp_path / "o")) == 1
    assert "up_proj" in capsys.readouterr().err
