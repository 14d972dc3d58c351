"""The mistral-ext command line: main(argv) in-process, plus real `python -m mistral_ext.cli` runs.

Generation runs on the embedded SmolLM2-135M-Instruct (greedy, a few tokens). Expected text
comes from the library API (model.generate + tokenizer.decode), the parameter count from the
GGUF file read by the `gguf` package, and a converted checkpoint from transformers' save.
"""
import io
import json
import os
import re
import subprocess
import sys

import gguf
import pytest
import torch
import transformers

from mistral_ext import MistralForCausalLM, MistralTokenizer, cli
from mistral_ext.loading import default_model_path

PROMPT = "The three primary colors are"
CAPITAL = "What is the capital of France?"
STATS = re.compile(r"^prefill: (\d+) tokens, [\d.]+ tokens/s; decode: (\d+) tokens, [\d.]+ tokens/s$", re.M)


@pytest.fixture(scope="module")
def default_model():
    path = default_model_path()
    return MistralForCausalLM.from_pretrained(path), MistralTokenizer.from_pretrained(path)


@pytest.fixture
def preloaded(monkeypatch, default_model):
    """In-process runs get the module's copy of the default model instead of loading it again
    (loading has its own tests, and the real processes below load it for real)."""
    model, tok = default_model
    path = default_model_path()
    load_model, load_tokenizer = MistralForCausalLM.from_pretrained, MistralTokenizer.from_pretrained

    def model_from(cls, where, **kwargs):
        if where == path and kwargs.get("dtype") == torch.float32 and torch.device(kwargs["device"]).type == "cpu":
            return model
        return load_model(where, **kwargs)

    def tokenizer_from(cls, where, **kwargs):
        return tok if where == path else load_tokenizer(where, **kwargs)

    monkeypatch.setattr(MistralForCausalLM, "from_pretrained", classmethod(model_from))
    monkeypatch.setattr(MistralTokenizer, "from_pretrained", classmethod(tokenizer_from))


def run_main(capsys, monkeypatch, argv, stdin: bytes = None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    assert err.strip() and "\n" not in err.strip(), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_generate_streams_the_greedy_continuation(preloaded, capsys, monkeypatch, default_model):
    model, tok = default_model
    ids = torch.tensor([tok.encode(PROMPT)])
    generated = model.generate(ids, max_new_tokens=6)[0, ids.shape[1]:]
    expected = tok.decode(generated, skip_special_tokens=True)
    code, out, err = run_main(capsys, monkeypatch, ["generate", "--max-new-tokens", "6", PROMPT])
    assert code == 0
    assert out == expected + "\n"
    stats = STATS.search(err)
    assert stats and int(stats[1]) == ids.shape[1] and int(stats[2]) == len(generated) - 1, err

    code, from_stdin, _ = run_main(capsys, monkeypatch, ["generate", "--max-new-tokens", "6"],
                                   stdin=PROMPT.encode())
    assert code == 0 and from_stdin == out


def test_generate_chat_answers_the_capital_question(preloaded, capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, ["generate", "--chat", "--max-new-tokens", "24", CAPITAL])
    assert code == 0
    assert "Paris" in out, out


def test_sampling_options_are_reproducible_with_a_seed(preloaded, capsys, monkeypatch):
    argv = ["generate", "--max-new-tokens", "8", "--temperature", "0.9", "--top-p", "0.95", "--top-k", "40",
            "--seed", "7", PROMPT]
    first = run_main(capsys, monkeypatch, argv)
    second = run_main(capsys, monkeypatch, argv)
    assert first[0] == second[0] == 0 and first[1] == second[1]


def test_chat_keeps_the_conversation_and_exits_on_exit(preloaded, capsys, monkeypatch, default_model):
    _, tok = default_model
    second_question = "And which river flows through it?"
    stdin = f"{CAPITAL}\n\n{second_question}\n/exit\nnever read\n".encode()
    code, out, err = run_main(capsys, monkeypatch, ["chat", "--max-new-tokens", "16"], stdin=stdin)
    assert code == 0
    stats = STATS.findall(err)
    assert len(stats) == 2, err   # two answers: the blank line is skipped, nothing after /exit
    first_answer = out.split("\n")[0]
    assert "Paris" in first_answer
    history = [{"role": "user", "content": CAPITAL}, {"role": "assistant", "content": first_answer},
               {"role": "user", "content": second_question}]
    assert int(stats[1][0]) == len(tok.apply_chat_template(history, add_generation_prompt=True))


def test_chat_ends_at_end_of_input(preloaded, capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, ["chat", "--max-new-tokens", "2"], stdin=b"Hi\n")
    assert code == 0 and len(STATS.findall(err)) == 1


def test_info_reports_config_parameters_dtype_and_kernels(capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, ["info"])
    assert code == 0
    stored = sum(int(t.n_elements) for t in gguf.GGUFReader(default_model_path()).tensors)
    assert f"parameters: {stored:,}" in out
    assert "dtype: float32" in out
    assert re.search(r"^CUDA kernels: (loaded|not built)", out, re.M)
    config = json.loads(out.split("config: ", 1)[1])
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)


def test_convert_then_info_and_generate(capsys, monkeypatch, tmp_path):
    hf_config = transformers.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2)
    transformers.MistralForCausalLM(hf_config).save_pretrained(tmp_path / "hf")
    code, out, err = run_main(capsys, monkeypatch, ["convert", "--input-dir", str(tmp_path / "hf"),
                                                     "--output-dir", str(tmp_path / "ours")])
    assert code == 0, err
    code, out, err = run_main(capsys, monkeypatch, ["info", str(tmp_path / "ours")])
    hf_parameters = sum(p.numel() for p in transformers.MistralForCausalLM(hf_config).parameters())
    assert code == 0 and f"parameters: {hf_parameters:,}" in out


def test_bench_is_wired(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "usage: mistral-ext bench" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit
def test_bad_model_path(capsys, monkeypatch, tmp_path):
    missing = str(tmp_path / "no_such_model")
    for argv in (["generate", "--model", missing, "hi"], ["chat", "--model", missing], ["info", missing]):
        code, out, err = run_main(capsys, monkeypatch, argv, stdin=b"")
        assert_one_line_error(code, err, missing)


def test_unreadable_files(capsys, monkeypatch, tmp_path):
    garbage = tmp_path / "model.gguf"
    garbage.write_bytes(os.urandom(4096))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"hidden_size": 64,')
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    for path in (garbage, broken):
        code, out, err = run_main(capsys, monkeypatch, ["generate", "--model", str(path), "hi"])
        assert_one_line_error(code, err, str(path))


def test_bad_options_are_argparse_errors(capsys):
    for argv in (["generate", "--bogus", "hi"], ["generate", "--dtype", "int8", "hi"],
                 ["generate", "--max-new-tokens", "many", "hi"], ["generate", "--top-p", "1.5", "hi"],
                 ["chat", "--temperature", "-1"], ["fly"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("mistral-ext") and "error:" in err


def test_bad_prompt_input(preloaded, capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, ["generate"], stdin=b"caf\xe9 au lait")
    assert_one_line_error(code, err, "UTF-8")
    code, out, err = run_main(capsys, monkeypatch, ["generate", ""])
    assert_one_line_error(code, err, "empty")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cuda_device_without_gpu(capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, ["generate", "--device", "cuda", "hi"])
    assert_one_line_error(code, err, "CUDA")


# ------------------------------------------------------------------------------------------------
# Real processes
def run_process(*args, stdin=b""):
    """`python -m mistral_ext`, as the README's quick start runs it."""
    return subprocess.run([sys.executable, "-m", "mistral_ext", *args], input=stdin, capture_output=True,
                          timeout=300)


def test_process_generate_and_error():
    done = run_process("generate", "--max-new-tokens", "3", PROMPT)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.strip() and STATS.search(done.stderr.decode())
    done = run_process("generate", "--model", "/no/such/model.gguf", "hi")
    assert_one_line_error(done.returncode, done.stderr.decode(), "/no/such/model.gguf")
