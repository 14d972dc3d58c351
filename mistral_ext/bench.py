"""`mistral-ext bench`: latency of our model next to transformers on the same weights, same run.

Measures, on the machine at hand:
  * the memory ceiling (device-to-device copy on CUDA, a large memcpy on CPU, bytes read +
    written) and from it the decode floor: weight bytes / bandwidth per token at batch 1;
  * ours: prefill time, decode ms/token at batch 1, decode tokens/s at a larger batch, peak memory;
    on CUDA a second time with the decode step replayed as a CUDA graph (its figures include the
    capture that every generate() call makes, as a user's call does), and a third time with the
    graph's kernels (projections, RoPE + cache write, attention) launched to overlap the kernel
    before each (MISTRAL_EXT_PDL=1);
  * transformers (eager and sdpa) on the same weights when it is installed, and the ratios.
Defaults: on CUDA the Mistral-7B config with random bf16 weights; on CPU the embedded SmolLM2
model in fp32. Figures are printed as a table and written as JSON with --json.
"""
import argparse
import gc
import json
import os
import platform
import time
from dataclasses import dataclass, asdict
from typing import Callable, Dict, List, Optional

import torch

from .bench_attention import environment_variable
from .config import MistralConfig

PDL_FLAG = "MISTRAL_EXT_PDL"  # 1: decode kernels overlap the kernel before each (programmatic dependent launch)


@dataclass
class RunFigures:
    name: str
    prefill_ms: float
    decode_ms_per_token: Optional[float]         # None: too few new tokens to time (see decode_seconds)
    batch_decode_tokens_per_s: Optional[float]
    peak_memory_gb: Optional[float] = None


def decode_seconds(generate_seconds: float, prefill_seconds: float) -> Optional[float]:
    """The decode steps' share of a generate() run: its time less the prefill's, or None when the
    machine's noise leaves nothing of it (a run of too few new tokens)."""
    return generate_seconds - prefill_seconds if generate_seconds > prefill_seconds else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint to load (default: random Mistral-7B weights on "
                        "CUDA, the embedded SmolLM2 model on CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="batch size of the batched decode run")
    parser.add_argument("--batch-new-tokens", type=int, default=None,
                        help="new tokens of the batched run (default: --new-tokens)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median is reported)")
    parser.add_argument("--no-peers", action="store_true", help="skip transformers")
    parser.add_argument("--json", help="also write the figures to this JSON file")


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large copy, counting bytes read plus bytes written."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 26)   # 1 GiB / 256 MiB of fp32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = _now(device)
        dst.copy_(src)
        best = min(best, _now(device) - start)
    return 2 * src.numel() * src.element_size() / best


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _median(values: List[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def check_fits(config: MistralConfig, dtype: torch.dtype, device: torch.device, batch: int,
               total_len: int, weights_allocated: bool = False) -> None:
    """Raises MemoryError before allocating when the weights (unless already allocated) and the
    caches of `batch` sequences of `total_len` tokens cannot fit in the free memory."""
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    params = (config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
              + config.num_hidden_layers * (
                  config.hidden_size * head_dim * (2 * config.num_attention_heads
                                                   + 2 * config.num_key_value_heads)
                  + 3 * config.hidden_size * config.intermediate_size + 2 * config.hidden_size))
    itemsize = torch.empty((), dtype=dtype).element_size()
    capacity = min(total_len, config.sliding_window or total_len)
    cache = 2 * config.num_hidden_layers * batch * capacity * config.num_key_value_heads * head_dim
    need = ((0 if weights_allocated else params) + cache) * itemsize
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = _available_host_memory()
    if need > 0.95 * free:
        what = "The caches of" if weights_allocated else "The weights and caches of"
        raise MemoryError(
            f"{what} the model ({params / 1e9:.2f}B parameters) at batch {batch} and {total_len} "
            f"tokens need {need / 2**30:.1f} GiB of {str(dtype).removeprefix('torch.')} on {device}, but only "
            f"{free / 2**30:.1f} GiB is free; use a smaller --batch/--prompt-len/--new-tokens or a smaller model")


def _available_host_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def time_workload(name: str, model, device: torch.device, vocab_size: int, args,
                  generate: Callable) -> RunFigures:
    """Prefill = one forward over the prompt; decode = (generate time - prefill) / new tokens."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab_size, (1, args.prompt_len), generator=gen).to(device)
    batch_prompt = torch.randint(3, vocab_size, (args.batch, args.prompt_len), generator=gen).to(device)

    def prefill(ids):
        with torch.inference_mode():
            start = _now(device)
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            return _now(device) - start

    def decode(ids, new_tokens):
        with torch.inference_mode():
            start = _now(device)
            generate(ids, new_tokens)
            total = _now(device) - start
        return total

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill(prompt)                      # warm-up: kernels, allocator, cuBLAS
    decode(prompt, min(8, args.new_tokens))
    prefills = [prefill(prompt) for _ in range(args.repeats)]
    t_prefill = _median(prefills)
    totals = [decode(prompt, args.new_tokens) for _ in range(args.repeats)]
    decode_time = decode_seconds(_median(totals), t_prefill)
    decode_ms = decode_time / args.new_tokens * 1e3 if decode_time else None
    t_batch_prefill = _median([prefill(batch_prompt) for _ in range(max(1, args.repeats - 1))])
    t_batch = _median([decode(batch_prompt, args.batch_new_tokens) for _ in range(max(1, args.repeats - 1))])
    batch_decode = decode_seconds(t_batch, t_batch_prefill)
    batch_tps = args.batch * args.batch_new_tokens / batch_decode if batch_decode else None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return RunFigures(name, t_prefill * 1e3, decode_ms, batch_tps, peak)


def _greedy_fixed_length(model, **options):
    """generate() of exactly `new_tokens` tokens (eos ignored), the same call for every framework."""
    def run(ids, new_tokens):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **options)
    return run


def build_ours(args, device: torch.device, dtype: torch.dtype):
    from .modeling import MistralForCausalLM
    # (batch, tokens) of the batch-1 run and of the batched run
    runs = ((1, args.prompt_len + args.new_tokens), (args.batch, args.prompt_len + args.batch_new_tokens))
    if args.model is None and device.type == "cuda":
        config = MistralConfig()   # Mistral-7B-v0.1 shapes
        for batch, tokens in runs:
            check_fits(config, dtype, device, batch, tokens)
        with torch.device(device):
            torch.manual_seed(0)
            model = MistralForCausalLM(config).to(dtype)
        model.fuse_projections()
        return model.eval()
    model = MistralForCausalLM.from_pretrained(args.model, dtype=dtype, device=device)
    for batch, tokens in runs:
        check_fits(model.config, dtype, device, batch, tokens, weights_allocated=True)
    return model


def build_peer(ours, args, device: torch.device, dtype: torch.dtype, attn_implementation: str):
    """transformers' model sharing our weight tensors (no second copy in memory)."""
    import transformers
    config_dict = ours.config.to_dict()
    config_dict.pop("architectures", None)
    config = transformers.MistralConfig(**{k: v for k, v in config_dict.items()
                                           if not k.startswith("_")})
    config._attn_implementation = attn_implementation
    with torch.device(device):  # non-persistent buffers (rotary frequencies) must be real
        peer = transformers.MistralForCausalLM(config).to(dtype)
    peer.load_state_dict(ours.state_dict(), strict=True, assign=True)
    peer.tie_weights()
    return peer.to(device=device, dtype=dtype).eval()


def _checked(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments with the batched run's token count filled in; ValueError for counts below 1."""
    for name in ("prompt_len", "new_tokens", "batch", "batch_new_tokens", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return argparse.Namespace(**{**vars(args), "batch_new_tokens": args.batch_new_tokens or args.new_tokens})


def run(args) -> Dict:
    args = _checked(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    bandwidth = copy_bandwidth(device)
    ours = build_ours(args, device, dtype)
    wbytes = weight_bytes(ours)
    floor_ms = wbytes / bandwidth * 1e3
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "model": args.model or ("random Mistral-7B" if device.type == "cuda" else "embedded SmolLM2-135M"),
        "weight_gb": wbytes / 1e9,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "decode_floor_ms_per_token": floor_ms,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": args.batch,
        "runs": [],
    }
    figures = [time_workload("ours", ours, device, ours.config.vocab_size, args, _greedy_fixed_length(ours))]
    if device.type == "cuda":
        # The decode step as one CUDA graph; then also with its kernels launched to overlap the
        # kernel before each (MISTRAL_EXT_PDL=1, opt-in: the caller vouches that no weight is
        # being written while it is read).
        for name, pdl in (("ours, CUDA graph", "0"), ("ours, CUDA graph + PDL", "1")):
            try:
                with environment_variable(PDL_FLAG, pdl):
                    figures.append(time_workload(name, ours, device, ours.config.vocab_size, args,
                                                 _greedy_fixed_length(ours, use_cuda_graph=True)))
            except RuntimeError as error:  # reported, and the peers are still measured
                print(f"{name}: failed: {error}")
                results.setdefault("errors", {})[name] = str(error)
    ours_count = len(figures)
    if not args.no_peers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed: peers skipped")
        else:
            for impl in ("eager", "sdpa"):
                peer = build_peer(ours, args, device, dtype, impl)
                figures.append(time_workload(f"transformers-{impl}", peer, device,
                                             ours.config.vocab_size, args, _greedy_fixed_length(peer)))
                del peer
                gc.collect()
    results["runs"] = [asdict(f) for f in figures]
    print_table(results, figures[:ours_count], figures[ours_count:])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def print_table(results: Dict, ours_runs: List[RunFigures], peer_runs: List[RunFigures]) -> None:
    floor = results["decode_floor_ms_per_token"]
    print(f"device: {results['device']}  dtype: {results['dtype']}  model: {results['model']} "
          f"({results['weight_gb']:.2f} GB of weights)")
    print(f"copy bandwidth {results['copy_bandwidth_gb_s']:.1f} GB/s -> decode floor {floor:.2f} ms/token "
          f"({1e3 / floor:.1f} tokens/s) at batch 1")
    print(f"prompt {results['prompt_len']} tokens, {results['new_tokens']} new tokens, "
          f"batched run at batch {results['batch']}")
    header = (f"{'':22} {'prefill ms':>11} {'decode ms/tok':>14} {'tok/s b=1':>10} "
              f"{'% of floor':>10} {'tok/s batch':>12} {'peak GiB':>9}")
    print(header)

    def cell(value: Optional[float], width: int, digits: int, suffix: str = "") -> str:
        return f"{value:{width - len(suffix)}.{digits}f}{suffix}" if value is not None else f"{'-':>{width}}"

    untimed = False
    for f in ours_runs + peer_runs:
        ms = f.decode_ms_per_token
        untimed |= ms is None or f.batch_decode_tokens_per_s is None
        print(f"{f.name:22} {f.prefill_ms:11.2f} {cell(ms, 14, 3)} {cell(ms and 1e3 / ms, 10, 1)} "
              f"{cell(ms and 100 * floor / ms, 10, 1, '%')} {cell(f.batch_decode_tokens_per_s, 12, 1)} "
              f"{cell(f.peak_memory_gb, 9, 2)}")
    if untimed:
        print("-: the generate() run took no longer than its prefill alone; give more --new-tokens / "
              "--batch-new-tokens")

    def ratio(label: str, numerator: Optional[float], denominator: Optional[float]) -> str:
        return f"{label} {numerator / denominator:.2f}x" if numerator and denominator else f"{label} -"

    for ours in ours_runs:
        for peer in peer_runs:
            print(f"{ours.name} vs {peer.name}: "
                  + ratio("decode", peer.decode_ms_per_token, ours.decode_ms_per_token) + " faster, "
                  + ratio("prefill", peer.prefill_ms, ours.prefill_ms) + ", "
                  + ratio("batched decode", ours.batch_decode_tokens_per_s, peer.batch_decode_tokens_per_s))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mistral-ext bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
