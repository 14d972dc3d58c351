"""GPU time per decode-attention call (attention + split combine), Mistral-7B shapes (32/8 heads,
head_dim 128, window 4096, bf16), one query per sequence:

    python scripts/time_decode_attention.py

Cases: batch 1 over a full, wrapped 4096-slot ring buffer (8192 tokens written); batch 64 over
the same; batch 1 over 700 cached keys (a 512-token prompt's decode). Each figure is the GPU time
per call of 200 calls replayed as one CUDA graph (a Python call takes longer to launch than the
kernels take to run), with the K/V bytes read per second.
"""
import torch

from mistral_ext.bench_attention import HEAD_DIM, KV_HEADS, WINDOW, decode_call, time_cuda_graph


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    for batch, written in ((1, 2 * WINDOW), (64, 2 * WINDOW), (1, 700)):
        seconds = time_cuda_graph(decode_call(batch, written)[0], repeats=5, calls=200)
        kv_bytes = 2 * batch * min(written, WINDOW) * KV_HEADS * HEAD_DIM * 2
        print(f"batch {batch:>2}, {min(written, WINDOW):>4} keys: {seconds * 1e6:8.2f} us/call, "
              f"{kv_bytes / seconds / 1e12:.2f} TB/s K/V")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
