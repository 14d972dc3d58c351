"""Where the time of a prefill and of a decode step goes, kernel by kernel (torch.profiler).

The model is the one `mistral-ext bench` times (random Mistral-7B weights in bf16 on CUDA, the
embedded SmolLM2 model in fp32 on CPU). For each mode it profiles
  * prefill: one forward over a --prompt-len prompt;
  * decode: generate() of 2 and of 2 + --steps new tokens on the same prompt; the difference is
    --steps decode steps (the prefill, the first step and, with a CUDA graph, its capture are in
    both), reported per step. The two runs size their caches differently, which at some lengths
    changes the attention's split count by one (its combine kernel then shows up in some steps).
Modes on CUDA: eager, the decode step as a CUDA graph, and the graph with its kernels launched to
overlap the one before (MISTRAL_EXT_PDL=1); on CPU: eager. For each it prints the wall time, the
device time summed over kernels (less than the wall time when the host paces the device; with
overlapping launches kernels may also overlap each other), the time per kernel family and the
kernels that take the most. On CUDA each family also gets the time it adds to the run: kernels
taken in the order they end, each adds how much later it ends than every kernel before it (gaps
where the device waits for the host included). These add up to the device's busy span; with
overlapping launches a kernel's own time starts when it is launched early, so only this column
says what e.g. attention costs the step beyond the projections around it. On CPU the rows are
operators' own CPU time instead of kernels. The profiler adds host time to every operator, so
eager wall times are longer here than in `bench`.

    PYTHONPATH=. python scripts/profile_step.py [--device cuda|cpu] [--prompt-len 512] [--steps 32]
        [--top 12] [--json FILE]
"""
import argparse
import json
import re
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from mistral_ext.bench import PDL_FLAG, build_ours
from mistral_ext.bench_attention import environment_variable

# Kernel (CUDA) or operator (CPU) names to the part of the model they belong to, first match wins.
FAMILIES = [
    ("projections, ours (GEMV)", r"linear_kernel|mistral_ext::linear"),
    ("projections, torch (cuBLAS)", r"gemm|gemv|cutlass|xmma|nvjet|cublas|aten::mm|aten::addmm"),
    ("attention", r"attention|combine_splits|mistral_ext::attention"),
    ("RoPE and cache write", r"rotary|rope|kv_cache|cache_write"),
    ("RMSNorm", r"rms_norm"),
    ("SiLU and mul", r"silu"),
    ("embedding", r"embedding|index_select"),
    ("sampling", r"argmax|topk|sort|softmax|multinomial|cumsum"),
]


def family(name: str) -> str:
    for label, pattern in FAMILIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def device_times(prof, device: torch.device) -> dict:
    """{name: (calls, microseconds)}: kernels on CUDA, operators' self time on CPU."""
    times = {}
    for event in prof.key_averages():
        if device.type == "cuda":
            if event.device_type != DeviceType.CUDA:
                continue
            micros = event.self_device_time_total
        else:
            if event.device_type != DeviceType.CPU or event.self_cpu_time_total <= 0:
                continue
            micros = event.self_cpu_time_total
        times[event.key] = (event.count, micros)
    return times


def added_times(events) -> dict:
    """{name: (calls, microseconds)}: how much later each kernel ends than every kernel that ends
    before it (the first one: than the earliest start), summed per name; the total is the span
    from the first kernel's start to the last one's end."""
    kernels = sorted((event for event in events if event.device_type == DeviceType.CUDA),
                     key=lambda event: event.time_range.end)
    times = {}
    latest_end = min((event.time_range.start for event in kernels), default=0)
    for event in kernels:
        added = max(event.time_range.end - latest_end, 0)
        latest_end = max(latest_end, event.time_range.end)
        calls, micros = times.get(event.name, (0, 0.0))
        times[event.name] = (calls + 1, micros + added)
    return times


def profiled(fn, device: torch.device):
    """(seconds of wall time, {name: (calls, microseconds)}, {name: (calls, microseconds added)}) of
    one call of fn; the last is empty on CPU."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    return wall, device_times(prof, device), added_times(prof.events()) if device.type == "cuda" else {}


def difference(longer: dict, shorter: dict, times: int) -> dict:
    """Per-repetition figures of what `longer` ran beyond `shorter`."""
    out = {}
    for name, (calls, micros) in longer.items():
        calls0, micros0 = shorter.get(name, (0, 0.0))
        if calls > calls0:
            out[name] = ((calls - calls0) / times, max(micros - micros0, 0.0) / times)
    return out


def by_family(times: dict) -> dict:
    families = defaultdict(float)
    for name, (_, micros) in times.items():
        families[family(name)] += micros
    return families


def summary(label: str, wall_ms: float, times: dict, added: dict, top: int, row_kind: str) -> dict:
    total_us = sum(micros for _, micros in times.values())
    families, families_added = by_family(times), by_family(added)
    print(f"\n{label}: wall {wall_ms:.3f} ms, summed device time {total_us / 1e3:.3f} ms "
          f"({100 * total_us / 1e3 / wall_ms:.0f}% of wall)")
    if added:
        print(f"  {'':28} {'kernel time':>12} {'':7} {'adds to the run':>15}")
    for name, micros in sorted(families.items(), key=lambda item: -item[1]):
        if micros > 0:
            extra = f" {families_added.get(name, 0.0) / 1e3:12.3f} ms" if added else ""
            print(f"  {name:28} {micros / 1e3:9.3f} ms {100 * micros / max(total_us, 1e-9):6.1f}%{extra}")
    print(f"  {'calls':>8} {'µs':>10}  {row_kind}")
    ranked = sorted(times.items(), key=lambda item: -item[1][1])
    for name, (calls, micros) in ranked[:top]:
        print(f"  {calls:8.1f} {micros:10.1f}  {name[:110]}")
    return {"wall_ms": wall_ms, "device_ms": total_us / 1e3,
            "families_ms": {k: v / 1e3 for k, v in families.items()},
            "families_added_ms": {k: v / 1e3 for k, v in families_added.items()},
            "kernels": {name: {"calls": calls, "us": micros} for name, (calls, micros) in ranked}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32, help="decode steps profiled")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per profile")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.prompt_len < 1 or args.steps < 1:
        parser.error("--prompt-len and --steps must be at least 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # build_ours reads these bench options: the random 7B model on CUDA, sized for the run.
    options = argparse.Namespace(model=None, batch=1, prompt_len=args.prompt_len, new_tokens=2 + args.steps,
                                 batch_new_tokens=2 + args.steps)
    model = build_ours(options, device, dtype)
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(0)).to(device)

    def generate(new_tokens: int, graph: bool):
        options = {"use_cuda_graph": True} if graph else {}
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **options)

    row_kind = "kernel" if device.type == "cuda" else "operator (own CPU time)"
    modes = [("eager", False, "0")]
    if device.type == "cuda":
        modes += [("CUDA graph", True, "0"), ("CUDA graph + PDL", True, "1")]
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "dtype": str(dtype),
               "prompt_len": args.prompt_len, "steps": args.steps, "profiles": {}}
    with torch.inference_mode():
        model(input_ids=prompt, use_cache=True, logits_to_keep=1)  # warm-up: kernels, allocator, cuBLAS
        wall, times, added = profiled(lambda: model(input_ids=prompt, use_cache=True, logits_to_keep=1), device)
        results["profiles"]["prefill"] = summary(f"prefill, {args.prompt_len} tokens", wall * 1e3, times, added,
                                                args.top, row_kind)
        for name, graph, pdl in modes:
            try:  # a mode that fails (a graph capture under the profiler, say) is reported, the rest still run
                with environment_variable(PDL_FLAG, pdl):
                    generate(2 + args.steps, graph)  # warm-up, the larger cache included
                    short_wall, short, short_added = profiled(lambda: generate(2, graph), device)
                    long_wall, long, long_added = profiled(lambda: generate(2 + args.steps, graph), device)
            except RuntimeError as error:
                print(f"\ndecode step, {name}: failed: {error}")
                results.setdefault("errors", {})[name] = str(error)
                continue
            per_step = difference(long, short, args.steps)
            added_per_step = difference(long_added, short_added, args.steps)
            wall_ms = (long_wall - short_wall) / args.steps * 1e3
            results["profiles"][f"decode, {name}"] = summary(f"decode step, {name} (per step, {args.steps} steps)",
                                                             wall_ms, per_step, added_per_step, args.top, row_kind)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
