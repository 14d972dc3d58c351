"""Plain-PyTorch versions of every op: the test oracle and the model's debugging backend.

Each function computes exactly what the kernel of the same name documents, in the most
direct way (fp32 math, explicit masks, duplicated K/V for GQA). Speed is not a concern here.
The in-place ops (names ending in "_") mutate their arguments like the kernels do.
"""
from typing import List, Optional, Tuple

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * inv_rms * weight.float()).to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    summed = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(summed, weight, eps), summed


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/D) for i < D/2, computed in float64 and rounded once to fp32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return (1.0 / (float(theta) ** exponents)).float()


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos and sin [..., D/2] in fp32 for int64 positions [...]."""
    angles = positions.float().unsqueeze(-1) * rope_inv_freq(head_dim, theta).to(positions.device)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rotary_embedding_(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                      theta: float) -> None:
    cos, sin = rope_cos_sin(positions, query.shape[-1], theta)
    valid = (positions >= 0)[..., None, None]
    query.copy_(torch.where(valid, _rotate(query, cos, sin), query))
    key.copy_(torch.where(valid, _rotate(key, cos, sin), key))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


_silu_and_mul = silu_and_mul  # shadowed inside linear by its keyword of the same name


def linear(x: torch.Tensor, weight: torch.Tensor, *, residual: Optional[torch.Tensor] = None,
           norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
           silu_and_mul: bool = False) -> torch.Tensor:
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    if silu_and_mul:
        x = _silu_and_mul(x)
    out = (x.float() @ weight.float().T).to(x.dtype)
    return out if residual is None else (out.float() + residual.float()).to(out.dtype)


def kv_cache_write_(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, positions: torch.Tensor) -> None:
    capacity = k_cache.shape[1]
    for b in range(key.shape[0]):
        last = int(positions[b, -1])
        for t in range(key.shape[1]):
            position = int(positions[b, t])
            if position < 0 or position <= last - capacity:
                continue
            k_cache[b, position % capacity] = key[b, t]
            v_cache[b, position % capacity] = value[b, t]


def rotary_embedding_cache_write_(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                                  theta: float) -> None:
    rotary_embedding_(query, key, positions, theta)
    kv_cache_write_(k_cache, v_cache, key, value, positions)


def cached_positions(cache_lens: torch.Tensor, capacity: int) -> torch.Tensor:
    """Position held by each ring-buffer slot, [batch, capacity]; -1 for empty slots.

    The cache of a sequence with L positions written holds [max(0, L - capacity), L); the
    position in slot s is the one of that range congruent to s modulo capacity.
    """
    lens = cache_lens.long().unsqueeze(1)
    slots = torch.arange(capacity, device=cache_lens.device).unsqueeze(0)
    newest = lens - 1
    position = newest - ((newest - slots) % capacity)
    return torch.where((position >= 0) & (position >= lens - capacity), position, -1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              k_cache: Optional[torch.Tensor], v_cache: Optional[torch.Tensor],
              positions: torch.Tensor, cache_lens: Optional[torch.Tensor],
              window: Optional[int], scale: float) -> torch.Tensor:
    """Sliding-window GQA attention of new tokens over (cache before this call) + new keys.

    q [B, T, H, D], k/v [B, T, Hkv, D], caches [B, C, Hkv, D], positions [B, T] (negative =
    padding), cache_lens [B]. A query at position i sees keys at positions j with
    i - window < j <= i (window None or <= 0: j <= i). Padding queries give zeros.
    """
    batch, tokens, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if k_cache is not None and k_cache.shape[1] > 0:
        key_pos = torch.cat([cached_positions(cache_lens, k_cache.shape[1]), positions], dim=1)
        keys = torch.cat([k_cache, k], dim=1)
        values = torch.cat([v_cache, v], dim=1)
    else:
        key_pos, keys, values = positions, k, v
    # Empty slots and padding tokens hold arbitrary data (NaN included) that must not leak.
    present = (key_pos >= 0)[..., None, None]
    keys, values = keys.float().where(present, 0.0), values.float().where(present, 0.0)
    query_pos = positions.unsqueeze(2)                       # [B, T, 1]
    key_pos = key_pos.unsqueeze(1)                           # [B, 1, S]
    mask = (key_pos >= 0) & (key_pos <= query_pos) & (query_pos >= 0)
    if window is not None and window > 0:
        mask &= key_pos > query_pos - window
    group = heads // kv_heads
    keys = keys.repeat_interleave(group, dim=2)              # [B, S, H, D]
    values = values.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), keys) * scale
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key (padding) -> 0
    out = torch.einsum("bhts,bshd->bthd", weights, values)
    return out.to(q.dtype)


def decoder_layer(hidden: torch.Tensor, positions: torch.Tensor, k_cache: Optional[torch.Tensor],
                  v_cache: Optional[torch.Tensor], cache_lens: Optional[torch.Tensor],
                  input_norm_weight: torch.Tensor, qkv_weights: List[torch.Tensor], o_weight: torch.Tensor,
                  post_attention_norm_weight: torch.Tensor, gate_up_weights: List[torch.Tensor],
                  down_weight: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                  rms_norm_eps: float, rope_theta: float, window: Optional[int], scale: float) -> torch.Tensor:
    batch, tokens, _ = hidden.shape
    qkv_weight, gate_up_weight = torch.cat(qkv_weights), torch.cat(gate_up_weights)
    qkv = linear(hidden, qkv_weight, norm_weight=input_norm_weight, eps=rms_norm_eps)
    q, k, v = qkv.split((num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim), dim=-1)
    q = q.reshape(batch, tokens, num_heads, head_dim)
    k = k.reshape(batch, tokens, num_kv_heads, head_dim)
    v = v.reshape(batch, tokens, num_kv_heads, head_dim)
    rotary_embedding_(q, k, positions, rope_theta)
    attended = attention(q, k, v, k_cache, v_cache, positions, cache_lens, window, scale)
    if k_cache is not None and k_cache.shape[1] > 0:
        kv_cache_write_(k_cache, v_cache, k, v, positions)
    h = linear(attended.reshape(batch, tokens, -1), o_weight, residual=hidden)
    gate_up = linear(h, gate_up_weight, norm_weight=post_attention_norm_weight, eps=rms_norm_eps)
    return linear(gate_up, down_weight, residual=h, silu_and_mul=True)
