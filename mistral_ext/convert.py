"""`mistral-ext convert`: a raw Mistral checkpoint (or any checkpoint we read) -> a transformers
directory: config.json, safetensors shards + index, tokenizer.model and its tokenizer config.

    mistral-ext convert --input_dir RAW --model_size 7B --output_dir OUT
    python -m mistral_ext.convert --input-dir RAW --output-dir OUT

The tensors stream from input to output one at a time (q/k rows permuted to the rotate-half
layout on the way), after their names and shapes are checked against the config.
"""
import argparse
import json
import os
import re
import shutil
import sys
from typing import List, Optional

from .loading import (CheckpointError, TensorToWrite, build_on_meta, match_tensors, open_checkpoint,
                      write_config, write_weights)
from .modeling import MistralForCausalLM

# Mistral ships tokenizer.model, or tokenizer.model.v1 / .v3 / ... for its versioned vocabularies.
_TOKENIZER_FILE = re.compile(r"tokenizer\.model(\.v\d+)?")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input_dir", "--input-dir", required=True,
                        help="raw Mistral directory (params.json + consolidated.*) or another checkpoint")
    parser.add_argument("--model_size", "--model-size",
                        help="the size label of transformers' converter (e.g. 7B); the shapes come from "
                             "params.json. 'tokenizer_only' converts the tokenizer only")
    parser.add_argument("--output_dir", "--output-dir", required=True, help="where to write")
    parser.add_argument("--max_shard_size", "--max-shard-size", default="5GB",
                        help="largest safetensors shard (default 5GB)")


def convert_tokenizer(input_dir: str, output_dir: str) -> Optional[str]:
    """Copies the sentencepiece model as tokenizer.model with a LlamaTokenizer config; returns
    the file copied, or None when the input has none."""
    candidates = sorted(name for name in os.listdir(input_dir) if _TOKENIZER_FILE.fullmatch(name))
    if not candidates:
        return None
    versions = {name: int(name.rsplit(".v", 1)[1]) if ".v" in name else -1 for name in candidates}
    source = min(candidates, key=lambda name: (versions[name] != -1, -versions[name]))  # plain, else newest
    os.makedirs(output_dir, exist_ok=True)
    shutil.copyfile(os.path.join(input_dir, source), os.path.join(output_dir, "tokenizer.model"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    files = {"tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer", **special,
                                       "add_bos_token": True, "add_eos_token": False,
                                       "clean_up_tokenization_spaces": False},
             "special_tokens_map.json": special}
    for name, values in files.items():
        with open(os.path.join(output_dir, name), "w", encoding="utf-8") as f:
            json.dump(values, f, indent=2)
            f.write("\n")
    return source


def convert(input_dir: str, output_dir: str, max_shard_size="5GB") -> List[str]:
    """Writes the transformers directory; returns the names of the tensors written."""
    checkpoint = open_checkpoint(input_dir)
    model = build_on_meta(MistralForCausalLM, checkpoint)
    plan, _ = match_tensors(model, checkpoint, strict=True)
    tensors = []
    for source, names in plan:
        ref = checkpoint.tensors[source]
        tensors.append(TensorToWrite(names[0], ref.shape, ref.dtype, ref.read))
    write_weights(output_dir, tensors, max_shard_size)
    write_config(model.config, output_dir, MistralForCausalLM.__name__, checkpoint.stored_dtype())
    return [t.name for t in tensors]


def run(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.input_dir):
        raise CheckpointError(f"{args.input_dir}: not a directory")
    if args.model_size != "tokenizer_only":
        names = convert(args.input_dir, args.output_dir, args.max_shard_size)
        print(f"wrote {len(names)} tensors and config.json to {args.output_dir}")
    tokenizer = convert_tokenizer(args.input_dir, args.output_dir)
    print(f"copied {tokenizer} as tokenizer.model" if tokenizer else
          f"no tokenizer.model in {args.input_dir}: tokenizer not converted")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mistral_ext.convert", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
