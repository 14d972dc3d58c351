"""Typed wrappers over torch.ops.mistral_ext.* with their fake (meta) implementations.

Layouts follow csrc/include/mistral_ext/kernels.h: tokens are [batch, tokens, heads, head_dim]
(heads and head_dim contiguous, tokens may be column slices of a fused projection), positions
are int64 [batch, tokens] with negative values for padding, and each layer's KV cache is a
pair of ring buffers [batch, capacity, kv_heads, head_dim] where position p lives in slot
p % capacity.
"""
from typing import List, Optional, Tuple

import torch

from . import _library  # noqa: F401  (registers the ops)

_ops = torch.ops.mistral_ext


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * weight, fp32 accumulation."""
    return _ops.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual) * weight, x + residual)."""
    return _ops.fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding_(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                      theta: float) -> None:
    """Rotates query [B, T, H, D] and key [B, T, Hkv, D] in place (rotate-half layout)."""
    _ops.rotary_embedding_(query, key, positions, theta)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x = [gate | up] of width 2I."""
    return _ops.silu_and_mul(x)


def kv_cache_write_(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, positions: torch.Tensor) -> None:
    """Scatters key/value [B, T, Hkv, D] into the ring buffers at slot position % capacity."""
    _ops.kv_cache_write_(k_cache, v_cache, key, value, positions)


def rotary_embedding_cache_write_(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                                  theta: float) -> None:
    """rotary_embedding_(query, key, positions, theta) then kv_cache_write_(k_cache, v_cache, key,
    value, positions) with the rotated key, in one pass (one kernel launch on CUDA)."""
    _ops.rotary_embedding_cache_write_(query, key, value, k_cache, v_cache, positions, theta)


def linear(x: torch.Tensor, weight: torch.Tensor, *, residual: Optional[torch.Tensor] = None,
           norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
           silu_and_mul: bool = False) -> torch.Tensor:
    """x @ weight.T over the last dimension (F.linear without bias), fp32 accumulation.

    x [..., K], weight [N, K] contiguous, same dtype and device. Few rows of x (decode) run our
    bandwidth-bound kernel; more rows go to torch's GEMM. "Few" is where ours measured faster:
    on CPU up to 16 rows in fp32 and 4 in bf16/fp16, on CUDA one row. torch's GEMM follows
    torch's precision settings: by default cuBLAS may reduce fp16 / bf16 partial sums in 16 bits
    (torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction and its bf16 twin).

    The decoder's steps around a projection come fused (one kernel at decode, the formulas
    and roundings of the separate ops): norm_weight [K] first applies
    rms_norm(x, norm_weight, eps); silu_and_mul takes x [..., 2K] = [gate | up] and first
    applies silu_and_mul(x); residual [..., N] is added to the product (each step rounded to
    the dtype, as the separate ops round).
    """
    return _ops.linear(x, weight, residual, norm_weight, eps, silu_and_mul)


@torch.library.register_fake("mistral_ext::rms_norm")
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("mistral_ext::fused_add_rms_norm")
def _fused_add_rms_norm_fake(x, residual, weight, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.register_fake("mistral_ext::rotary_embedding_")
def _rotary_embedding_fake(query, key, positions, theta):
    return None


@torch.library.register_fake("mistral_ext::silu_and_mul")
def _silu_and_mul_fake(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.register_fake("mistral_ext::kv_cache_write_")
def _kv_cache_write_fake(k_cache, v_cache, key, value, positions):
    return None


@torch.library.register_fake("mistral_ext::rotary_embedding_cache_write_")
def _rotary_embedding_cache_write_fake(query, key, value, k_cache, v_cache, positions, theta):
    return None


@torch.library.register_fake("mistral_ext::linear")
def _linear_fake(x, weight, residual=None, norm_weight=None, eps=1e-6, silu_and_mul=False):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("mistral_ext::attention")
def _attention_fake(q, k, v, k_cache, v_cache, positions, cache_lens, window, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              k_cache: Optional[torch.Tensor], v_cache: Optional[torch.Tensor],
              positions: torch.Tensor, cache_lens: Optional[torch.Tensor],
              window: Optional[int], scale: float) -> torch.Tensor:
    """Sliding-window GQA attention of new tokens over the cache (as before this call) + themselves.

    q [B, T, H, D], k/v [B, T, Hkv, D], k_cache/v_cache [B, C, Hkv, D] ring buffers (or None),
    positions int64 [B, T] (negative = padding), cache_lens int32 [B]: positions already in the
    cache (it holds [max(0, L - C), L)). window None or <= 0: plain causal. Returns [B, T, H, D].
    """
    return _ops.attention(q, k, v, k_cache, v_cache, positions, cache_lens, window or 0, scale)


def decoder_layer(hidden: torch.Tensor, positions: torch.Tensor, k_cache: Optional[torch.Tensor],
                  v_cache: Optional[torch.Tensor], cache_lens: Optional[torch.Tensor],
                  input_norm_weight: torch.Tensor, qkv_weights: List[torch.Tensor], o_weight: torch.Tensor,
                  post_attention_norm_weight: torch.Tensor, gate_up_weights: List[torch.Tensor],
                  down_weight: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                  rms_norm_eps: float, rope_theta: float, window: Optional[int], scale: float) -> torch.Tensor:
    """One decoder layer: the residual stream hidden [B, T, hidden] after attention and the MLP (the
    math of mistral_ext.modeling's docstring), the ops above run from C++ in one call. The caches
    (as for attention, or None) are written with the chunk's keys and values; cache_lens is not
    advanced. A single token writes its key before attention, which is exact when the capacity is
    at least the window or never wraps (as RollingCache sizes it).
    qkv_weights: [W_q|W_k|W_v] as one tensor, or the three; gate_up_weights: [W_gate|W_up] or the two.
    """
    if (k_cache is None) != (v_cache is None):
        raise ValueError("k_cache and v_cache must both be given or both be None")
    if k_cache is None:  # the op takes "no cache" as caches of capacity 0
        k_cache, v_cache = (hidden.new_empty(hidden.shape[0], 0, num_kv_heads, head_dim) for _ in range(2))
    return _ops.decoder_layer(hidden, positions, k_cache, v_cache, cache_lens, input_norm_weight, qkv_weights,
                              o_weight, post_attention_norm_weight, gate_up_weights, down_weight, num_heads,
                              num_kv_heads, head_dim, rms_norm_eps, rope_theta, window or 0, scale)


@torch.library.register_fake("mistral_ext::decoder_layer")
def _decoder_layer_fake(hidden, positions, k_cache, v_cache, cache_lens, input_norm_weight, qkv_weights, o_weight,
                        post_attention_norm_weight, gate_up_weights, down_weight, num_heads, num_kv_heads,
                        head_dim, rms_norm_eps, rope_theta, window, scale):
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)
