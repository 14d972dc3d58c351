"""The README's usage snippets run, so the README cannot rot.

The python blocks under README.md's "## Usage (transformers API)" heading (the seed
documentation's snippets with `from mistral_ext import ...`) are extracted at test time, as
doctest-style `>>>` sessions or plain code, and run on a small local model in transformers'
format (transformers' MistralForCausalLM saved with save_pretrained, plus Mistral-7B's real
sentencepiece tokenizer from mistral-common). Substitutions, explicit and nothing else:

  * the string "cuda" -> "cpu"                          (no GPU needed)
  * from_pretrained(<hub id / placeholder>, ...) -> from_pretrained("<local model dir>", ...)
  * a snippet that builds the default config (MistralConfig()) runs under torch.device("meta"):
    the Mistral-7B shapes are built and counted, 7B weights are never allocated.

A `>>>` statement followed by an expected string is evaluated: it must give a str that contains
the snippet's prompt (random weights cannot reproduce the documented text).
"""
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import mistral_common
import pytest
import torch
import transformers

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = re.compile(r"^##\s+Usage \(transformers API\)\s*$", re.M)
CODE_BLOCK = re.compile(r"^```[ \t]*(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
FROM_PRETRAINED_ARG = re.compile(r"""from_pretrained\(\s*("[^"]*"|'[^']*'|[A-Za-z_]\w*)""")
CUDA_STRING = re.compile(r"""(["'])cuda(:\d+)?\1""")
# Every class the seed's snippets use must appear in the README's.
SEED_NAMES = {"AutoModelForCausalLM", "AutoTokenizer", "MistralForCausalLM", "LlamaTokenizer", "MistralConfig",
              "MistralModel"}


@dataclass
class Statement:
    source: str
    expected: Optional[str] = None   # the documented output of a `>>>` statement


def usage_snippets(markdown: str) -> List[str]:
    """The python code blocks of the usage section (up to the next level-2 heading)."""
    match = HEADING.search(markdown)
    if match is None:
        raise LookupError(f"README.md has no '## Usage (transformers API)' section")
    end = re.compile(r"^## ", re.M).search(markdown, match.end())
    section = markdown[match.end():end.start() if end else len(markdown)]
    return [code for language, code in CODE_BLOCK.findall(section)
            if language in ("", "python", "py", "pycon") and "mistral_ext" in code]


def statements(code: str) -> List[Statement]:
    """A `>>>` session split into statements (with their expected output), or one plain block."""
    lines = code.splitlines()
    if not any(line.startswith(">>>") for line in lines):
        return [Statement(code)]
    result: List[Statement] = []
    for line in lines:
        if line.startswith(">>>"):
            result.append(Statement(line[4:]))
        elif line.startswith("...") and result:
            result[-1].source += "\n" + line[4:]
        elif line.strip() and result:
            result[-1].expected = ((result[-1].expected or "") + line.strip())
    return result


def localize(code: str, model_dir: Path) -> str:
    code = CUDA_STRING.sub('"cpu"', code)
    return FROM_PRETRAINED_ARG.sub(lambda _: f"from_pretrained({str(model_dir)!r}", code)


def run_snippet(code: str, model_dir: Path) -> dict:
    namespace = {"__name__": "readme_snippet"}
    on_meta = re.search(r"MistralConfig\(\s*\)", code) is not None
    with torch.device("meta") if on_meta else torch.device("cpu"):
        for statement in statements(localize(code, model_dir)):
            if statement.expected is None:
                exec(compile(statement.source, "README.md", "exec"), namespace)
                continue
            value = eval(compile(statement.source, "README.md", "eval"), namespace)
            if statement.expected[:1] in "\"'":
                assert isinstance(value, str), statement.source
                assert namespace.get("prompt", "") in value, (statement.source, value)
    return namespace


try:
    SNIPPETS = usage_snippets(README.read_text(encoding="utf-8"))
    MISSING = None
except (OSError, LookupError) as error:
    SNIPPETS, MISSING = [], str(error)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Mistral in transformers' format with the real Mistral-7B tokenizer (vocab 32000)."""
    directory = tmp_path_factory.mktemp("readme_model")
    config = transformers.MistralConfig(vocab_size=32000, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.MistralForCausalLM(config).save_pretrained(directory)
    shutil.copyfile(Path(mistral_common.__path__[0]) / "data" / "tokenizer.model.v1", directory / "tokenizer.model")
    return directory


def test_readme_carries_the_seed_snippets():
    assert MISSING is None, MISSING
    imported = set()
    for code in SNIPPETS:
        assert not re.search(r"^\W*(from transformers |import transformers)", code, re.M), code
        for names in re.findall(r"from mistral_ext import ([^\n]+)", code):
            imported |= {name.strip(" ()") for name in names.split(",")}
    assert SEED_NAMES <= imported, f"README snippets lack {sorted(SEED_NAMES - imported)}"
    assert any("use_flash_attention_2" in code for code in SNIPPETS), "the Flash Attention 2 snippet is missing"


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, model_dir):
    code = SNIPPETS[index]
    namespace = run_snippet(code, model_dir)
    if re.search(r"MistralConfig\(\s*\)", code):
        with torch.device("meta"):
            peer = transformers.MistralModel(transformers.MistralConfig())
        model = namespace["model"]
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in peer.parameters())
