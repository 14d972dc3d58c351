"""Weight-read bandwidth of mistral_ext's linear next to torch's F.linear on decode shapes.

A decode step at small batch streams every weight once, so the speed of its matmuls is the rate at
which they read their weights. For each projection of a decoder layer and the LM head, at 1 and 16
input rows (--rows), this times ours and F.linear on the same weights in the same run and prints GB/s of
weight read by each. Many copies of each weight are cycled through, at least 256 MB in all, so
that none is cache-resident, as in a real decode step. The "step" rows time a whole step's
matmuls: every layer's projections in order, then the head; on CUDA also replayed as a CUDA graph
(no launch gaps from the host), and so again with our projections launched to overlap the one
before (MISTRAL_EXT_PDL=1; F.linear unchanged). The ms columns are the time of one pass: one call
per copy, or one step.

  CPU:  the embedded SmolLM2-135M's shapes (hidden 576, 30 layers, tied 49152-row head), fp32, bf16
  CUDA: Mistral-7B's shapes (hidden 4096, 32 layers, 32000-row head), bf16, CUDA-event timings

    python scripts/bench_linear.py [--device cpu|cuda] [--dtypes float32 bfloat16] [--rows 1 16] [--repeats 5]
"""
import argparse
import math

import torch
import torch.nn.functional as F

from mistral_ext import ops
from mistral_ext.bench import PDL_FLAG
from mistral_ext.bench_attention import environment_variable, graphed, time_cpu, time_cuda

# name, layers, per-layer (projection, out_features, in_features), the LM head (fused q|k|v and
# gate|up projections, as the model runs them).
MODELS = {
    "cpu": ("SmolLM2-135M", 30,
            [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)],
            ("lm_head", 49152, 576)),
    "cuda": ("Mistral-7B", 32,
             [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
             ("lm_head", 32000, 4096)),
}
COLD_BYTES = 256 << 20


def median_seconds(fn, device: str, repeats: int) -> float:
    return (time_cuda if device == "cuda" else time_cpu)(fn, repeats)


def cycle(linear, pairs):
    def run():
        for x, w in pairs:
            linear(x, w)
    return run


def compare(label: str, pairs, device: str, repeats: int, capture=None) -> None:
    """Ours and F.linear over `pairs`; capture(fn) -> fn replaces each (a CUDA graph) when given."""
    weight_bytes = sum(w.numel() * w.element_size() for _, w in pairs)
    capture = capture or (lambda fn: fn)
    ours = median_seconds(capture(cycle(ops.linear, pairs)), device, repeats)
    theirs = median_seconds(capture(cycle(F.linear, pairs)), device, repeats)
    print(f"{label:<46} {weight_bytes / ours / 1e9:>9.1f} {weight_bytes / theirs / 1e9:>10.1f} "
          f"{theirs / ours:>6.2f}x   {ours * 1e3:>8.2f} {theirs * 1e3:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="input rows (batch) to time")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = args.device
    dtypes = args.dtypes or (["bfloat16"] if device == "cuda" else ["float32", "bfloat16"])
    model, layers, projections, head = MODELS[device]
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{model} decode shapes on {where}; torch {torch.__version__}")
    print(f"{'':<46} {'ours GB/s':>9} {'torch GB/s':>10} {'ratio':>7}   {'ours ms':>8} {'torch ms':>9}")

    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        size = torch.empty((), dtype=dtype).element_size()
        # Per projection: max(layers, enough copies for COLD_BYTES); the first `layers` copies of
        # each also make up the whole step.
        weights = {}
        for name, n, k in projections + [head]:
            copies = 1 if name == head[0] else layers
            copies = max(copies, math.ceil(COLD_BYTES / (n * k * size)))
            weights[name] = [torch.randn(n, k, device=device).to(dtype) for _ in range(copies)]
        for rows in args.rows:
            inputs = {k: torch.randn(rows, k, device=device).to(dtype) for _, _, k in projections + [head]}
            for name, n, k in projections + [head]:
                pairs = [(inputs[k], w) for w in weights[name]]
                compare(f"{name} {n}x{k}, M={rows}, {dtype_name}", pairs, device, args.repeats)
            step = [(inputs[k], weights[name][layer]) for layer in range(layers) for name, _, k in projections]
            step.append((inputs[head[2]], weights[head[0]][0]))
            compare(f"step: {layers} layers + head, M={rows}, {dtype_name}", step, device, args.repeats)
            if device == "cuda":
                compare(f"step, CUDA graph, M={rows}", step, device, args.repeats, graphed)
                with environment_variable(PDL_FLAG, "1"):  # read by our launches while captured
                    compare(f"step, CUDA graph, ours + PDL, M={rows}", step, device, args.repeats, graphed)
        del weights


if __name__ == "__main__":
    main()
