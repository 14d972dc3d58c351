"""Attention microbenchmark: our kernels next to torch SDPA and FlexAttention, in one run.

    python -m mistral_ext.bench_attention [--json PATH] [--repeats N]

On CUDA, Mistral-7B shapes (32 query heads, 8 kv heads, head_dim 128, window 4096, bf16):
  * prefill S = 4096 and 16384 in one call: ours (sliding window) vs SDPA's flash backend (full
    causal, what a model without a window kernel runs) vs FlexAttention with a sliding-window block
    mask (compiled); time and in-window TFLOP/s (4 * head_dim * heads per visible query-key pair;
    for SDPA the causal pairs it computes); on an sm_90 GPU both of our prefill kernels (mma.sync,
    and wgmma), each first checked against FlexAttention's output;
  * decode, one query per sequence over a full 4096-entry ring buffer, batch 1, 16 and 64: ours vs
    SDPA; microseconds and TB/s of K/V read. A decode call takes less GPU time than a Python call
    takes to launch it, so each figure is the GPU time per call of 100 calls replayed as one CUDA
    graph (as a model's decode step runs them), for both.
Times are medians of CUDA-event timings. Without a GPU it says so and runs a small CPU
comparison (ours vs SDPA, SmolLM2-135M attention shapes) instead: prefill, and decode with the K/V
in cache and, as in a model's decode step, read from memory.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, asdict
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import ops

HEADS, KV_HEADS, HEAD_DIM, WINDOW = 32, 8, 128, 4096
SM90_FLAG = "MISTRAL_EXT_SM90_ATTENTION"  # 0: not the Hopper (wgmma) prefill kernel, the default on sm_90


@dataclass
class Row:
    workload: str
    peer: str
    ours: float          # ms (prefill) or us (decode)
    peer_time: float
    unit: str
    ours_rate: float     # TFLOP/s (prefill) or TB/s (decode)
    peer_rate: float
    rate_unit: str

    @property
    def speedup(self) -> float:
        return self.peer_time / self.ours


def time_cuda(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of fn() over CUDA-event timings, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def graphed(fn: Callable[[], object], calls: int = 1) -> Callable[[], None]:
    """`calls` calls of fn captured as one CUDA graph: its replay launches the kernels with no host
    work between them. The warm-up call (cuBLAS handles, workspaces) runs on a side stream outside
    the capture, as torch advises."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph.replay


def time_cuda_graph(fn: Callable[[], object], repeats: int, calls: int = 100) -> float:
    """Median GPU seconds per fn() call, of `calls` calls replayed as one CUDA graph."""
    return time_cuda(graphed(fn, calls), repeats) / calls


def time_cpu(fn: Callable[[], object], repeats: int, before: Callable[[], object] = lambda: None) -> float:
    """Median time of fn(); before() runs untimed ahead of each call."""
    fn()
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def environment_variable(name: str, value: str):
    """`name` set to `value` inside the block (read by the kernels' launchers at each call)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def visible_pairs(seq: int, window: Optional[int]) -> int:
    """Query-key pairs a causal (window None) or sliding-window prompt of `seq` tokens computes."""
    if window is None or window >= seq:
        return seq * (seq + 1) // 2
    return window * (window + 1) // 2 + (seq - window) * window


def our_prefill_kernels() -> List[Tuple[str, str]]:
    """(label, MISTRAL_EXT_SM90_ATTENTION value) of each prefill kernel of ours this GPU can run."""
    kernels = [("mma.sync", "0")]
    if torch.cuda.get_device_capability() == (9, 0):
        kernels.append(("wgmma", "1"))
    return kernels


def prefill_rows(seq: int, repeats: int) -> List[Row]:
    device, dtype, scale = "cuda", torch.bfloat16, HEAD_DIM ** -0.5
    q = torch.randn(1, seq, HEADS, HEAD_DIM, device=device, dtype=dtype)
    k = torch.randn(1, seq, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    v = torch.randn(1, seq, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    positions = torch.arange(seq, device=device)[None]
    flop_per_pair = 4 * HEAD_DIM * HEADS
    window_flop = visible_pairs(seq, WINDOW) * flop_per_pair

    # Peers take [batch, heads, seq, head_dim]; SDPA's flash backend gets K/V expanded to all heads
    # outside the timed region.
    qt, kt, vt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    group = HEADS // KV_HEADS
    k_full, v_full = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        sdpa = time_cuda(lambda: F.scaled_dot_product_attention(qt, k_full, v_full, is_causal=True, scale=scale),
                         repeats)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)

    block_mask = create_block_mask(sliding_window, B=None, H=None, Q_LEN=seq, KV_LEN=seq, device=device)
    flex = torch.compile(flex_attention, dynamic=False)
    flex_call = lambda: flex(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=True)  # noqa: E731
    flex_time = time_cuda(flex_call, repeats)
    expected = flex_call().transpose(1, 2).float()

    rows = []
    for label, flag in our_prefill_kernels():
        with environment_variable(SM90_FLAG, flag):
            call = lambda: ops.attention(q, k, v, None, None, positions, None, WINDOW, scale)  # noqa: E731
            error = ((call().float() - expected).abs().max() / expected.abs().max()).item()
            if error > 2e-2:
                raise RuntimeError(f"our {label} prefill differs from FlexAttention by {error:.3g} (relative)")
            ours = time_cuda(call, repeats)
        workload = f"prefill S={seq} {label}"
        rows.append(Row(workload, "SDPA flash (full causal)", ours * 1e3, sdpa * 1e3, "ms", window_flop / ours / 1e12,
                        visible_pairs(seq, None) * flop_per_pair / sdpa / 1e12, "TFLOP/s"))
        rows.append(Row(workload, "FlexAttention sliding window", ours * 1e3, flex_time * 1e3, "ms",
                        window_flop / ours / 1e12, window_flop / flex_time / 1e12, "TFLOP/s"))
    return rows


def decode_call(batch: int, written: int):
    """(our decode attention call, its q): one query per sequence, bf16, `written` tokens already
    through a WINDOW-slot ring buffer (more than WINDOW: full and wrapped)."""
    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    q, k, v = randn(batch, 1, HEADS, HEAD_DIM), randn(batch, 1, KV_HEADS, HEAD_DIM), randn(batch, 1, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = randn(batch, WINDOW, KV_HEADS, HEAD_DIM), randn(batch, WINDOW, KV_HEADS, HEAD_DIM)
    positions = torch.full((batch, 1), written, device="cuda", dtype=torch.int64)
    cache_lens = torch.full((batch,), written, device="cuda", dtype=torch.int32)
    return lambda: ops.attention(q, k, v, k_cache, v_cache, positions, cache_lens, WINDOW, HEAD_DIM ** -0.5), q


def decode_row(batch: int, repeats: int) -> Row:
    call, q = decode_call(batch, 2 * WINDOW)  # a long generation: the ring buffer is full and has wrapped
    ours = time_cuda_graph(call, repeats)

    qt = q.transpose(1, 2).contiguous()                                    # [batch, heads, 1, d]
    kt = torch.randn(batch, KV_HEADS, WINDOW, HEAD_DIM, device="cuda", dtype=q.dtype)
    vt = torch.randn_like(kt)
    sdpa = time_cuda_graph(lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=HEAD_DIM ** -0.5, enable_gqa=True),
                           repeats)
    kv_bytes = 2 * batch * WINDOW * KV_HEADS * HEAD_DIM * q.element_size()
    return Row(f"decode batch {batch}", "SDPA", ours * 1e6, sdpa * 1e6, "us", kv_bytes / ours / 1e12,
               kv_bytes / sdpa / 1e12, "TB/s K/V")


def cpu_rows(repeats: int) -> List[Row]:
    """SmolLM2-135M attention (9 heads, 3 kv heads, head_dim 64, no window), fp32, on the CPU."""
    heads, kv_heads, d, scale = 9, 3, 64, 64 ** -0.5
    rows = []
    seq = 512
    q, k, v = (torch.randn(1, seq, h, d) for h in (heads, kv_heads, kv_heads))
    positions = torch.arange(seq)[None]
    ours = time_cpu(lambda: ops.attention(q, k, v, None, None, positions, None, None, scale), repeats)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    sdpa = time_cpu(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale,
                                                           enable_gqa=True), repeats)
    flop = visible_pairs(seq, None) * 4 * d * heads
    rows.append(Row(f"prefill S={seq}", "SDPA (causal)", ours * 1e3, sdpa * 1e3, "ms", flop / ours / 1e12,
                    flop / sdpa / 1e12, "TFLOP/s"))
    cached = 1024
    q, k, v = (torch.randn(1, 1, h, d) for h in (heads, kv_heads, kv_heads))
    k_cache, v_cache = torch.randn(1, 2 * cached, kv_heads, d), torch.randn(1, 2 * cached, kv_heads, d)
    positions, lens = torch.tensor([[cached]]), torch.tensor([cached], dtype=torch.int32)
    kt, vt = k_cache[:, :cached + 1].transpose(1, 2), v_cache[:, :cached + 1].transpose(1, 2)
    kv_bytes = 2 * (cached + 1) * kv_heads * d * 4
    # In a model's decode step the weights streamed since the last step have evicted the cache:
    # the second pair of figures reads K/V from memory (a buffer larger than the caches read first).
    evictor = torch.ones(16 << 20)
    for label, before in (("", lambda: None), (", K/V cold", lambda: evictor.sum())):
        ours = time_cpu(lambda: ops.attention(q, k, v, k_cache, v_cache, positions, lens, None, scale), repeats,
                        before)
        sdpa = time_cpu(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, scale=scale,
                                                               enable_gqa=True), repeats, before)
        rows.append(Row(f"decode {cached} keys{label}", "SDPA", ours * 1e6, sdpa * 1e6, "us",
                        kv_bytes / ours / 1e12, kv_bytes / sdpa / 1e12, "TB/s K/V"))
    return rows


def print_table(rows: List[Row]) -> None:
    header = f"{'workload':<27} {'peer':<30} {'ours':>10} {'peer':>10} {'speedup':>8}   {'ours':>8} {'peer':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.workload:<27} {r.peer:<30} {r.ours:>7.3g} {r.unit:<2} {r.peer_time:>7.3g} {r.unit:<2} "
              f"{r.speedup:>7.2f}x   {r.ours_rate:>8.3g} {r.peer_rate:>8.3g}  {r.rate_unit}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mistral_ext.bench_attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per figure (median)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
        rows = prefill_rows(4096, args.repeats) + prefill_rows(16384, args.repeats)
        rows += [decode_row(batch, args.repeats) for batch in (1, 16, 64)]
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        print("No CUDA GPU here: the Mistral-7B comparison needs one. Small CPU comparison instead.")
        rows = cpu_rows(args.repeats)
    print(f"device: {device}; torch {torch.__version__}; speedup = peer time / ours")
    print_table(rows)
    if args.json:
        record = {"device": device, "torch": torch.__version__,
                  "date": datetime.date.today().isoformat(),
                  "command": "python -m mistral_ext.bench_attention" + (f" --repeats {args.repeats}"),
                  "rows": [dict(asdict(r), speedup=r.speedup) for r in rows]}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
