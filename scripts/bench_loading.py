"""Loading speed of a Mistral-7B-shaped checkpoint next to the time it takes to read its bytes.

Writes a random bf16 checkpoint in transformers' layout (config.json + 5 GB safetensors shards,
14.5 GB for the 32 layers of Mistral-7B; --layers N for a smaller one) unless it is there, then
times, first with these files out of the page cache (posix_fadvise DONTNEED on them; nothing
else is dropped) and then with them cached:
  read  the files' bytes, sequentially (what `cat files > /dev/null` does)
  load  MistralForCausalLM.from_pretrained(dir, dtype=torch.bfloat16) on the CPU

    python scripts/bench_loading.py [--dir /tmp/mistral_ext_7b] [--layers 32] [--delete]
"""
import argparse
import gc
import glob
import os
import shutil
import time

import torch

from mistral_ext import MistralConfig, MistralForCausalLM
from mistral_ext.loading import TensorToWrite, write_config, write_weights


def write_random_checkpoint(directory: str, layers: int) -> None:
    config = MistralConfig(num_hidden_layers=layers)  # Mistral-7B-v0.1's shapes
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    tensors = [TensorToWrite(name, tuple(p.shape), torch.bfloat16,
                             lambda shape=tuple(p.shape): torch.randn(shape, generator=generator).to(torch.bfloat16))
               for name, p in model.state_dict().items()]
    write_weights(directory, tensors)
    write_config(config, directory, MistralForCausalLM.__name__, torch.bfloat16)


def weight_files(directory: str):
    return sorted(glob.glob(os.path.join(directory, "*.safetensors")))


def drop_from_page_cache(files) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bytes(files) -> None:
    buffer = bytearray(16 << 20)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load(directory: str) -> None:
    model = MistralForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    del model
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/mistral_ext_7b")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--delete", action="store_true", help="delete the checkpoint afterwards")
    args = parser.parse_args()

    if not weight_files(args.dir):
        print(f"writing a random {args.layers}-layer Mistral-7B-shaped checkpoint to {args.dir} ...", flush=True)
        print(f"  written in {timed(lambda: write_random_checkpoint(args.dir, args.layers)):.1f} s")
    files = weight_files(args.dir)
    gb = sum(os.path.getsize(f) for f in files) / 1e9
    print(f"{len(files)} files, {gb:.2f} GB, torch {torch.__version__}, {os.cpu_count()} CPUs")

    rows = []
    for state in ("cold", "warm"):
        if state == "cold":
            drop_from_page_cache(files)
        else:
            read_bytes(files)
        rows.append((f"read ({state})", timed(lambda: read_bytes(files))))
        if state == "cold":
            drop_from_page_cache(files)
        else:
            read_bytes(files)
        rows.append((f"load ({state})", timed(lambda: load(args.dir))))
    for name, seconds in rows:
        print(f"{name:12s} {seconds:7.2f} s  {gb / seconds:6.2f} GB/s")
    if args.delete:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
