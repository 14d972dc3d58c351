"""RollingCache: the model's KV cache, one pair of ring buffers per layer.

Layout (csrc/include/mistral_ext/kernels.h): key and value buffers [batch, capacity, kv_heads,
head_dim]; the token at position p of row b lives in slot p % capacity, and `cache_lens[b]`
(int32, on the device) counts the positions written, so the cache holds
[max(0, len - capacity), len). With a sliding window W the capacity never exceeds W: memory
stays flat however long the sequence grows.

Buffers are allocated at first use, sized for what is needed so far (at least `max_length`
when given), and grow (doubling) up to W, or without bound when there is no window. While the
capacity is below W every position written is below it too, so slot == position and growing
only copies the buffers into larger ones.
"""
from typing import List, Optional

import torch


class RollingCache:
    """Ring-buffer KV cache of a MistralModel; pass it back as `past_key_values` to continue."""

    def __init__(self, config, max_length: Optional[int] = None):
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        self.max_length = max_length
        self.key_cache: List[torch.Tensor] = []
        self.value_cache: List[torch.Tensor] = []
        self.cache_lens: Optional[torch.Tensor] = None  # int32 [batch]
        self.seen_tokens = 0

    @property
    def batch_size(self) -> Optional[int]:
        return None if self.cache_lens is None else self.cache_lens.shape[0]

    @property
    def capacity(self) -> int:
        return self.key_cache[0].shape[1] if self.key_cache else 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(t.numel() * t.element_size() for t in self.key_cache + self.value_cache)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens fed so far, padding included (transformers' meaning)."""
        return self.seen_tokens

    def _target_capacity(self, needed: int) -> int:
        target = max(needed, self.max_length or 0, 2 * self.capacity, 1)
        return target if self.sliding_window is None else min(self.sliding_window, target)

    def reserve(self, batch_size: int, needed: int, dtype: torch.dtype, device: torch.device) -> None:
        """Makes room for positions < `needed` (called by the model before a chunk runs)."""
        if self.cache_lens is not None:
            if batch_size != self.batch_size:
                raise ValueError(f"past_key_values holds a batch of {self.batch_size} rows, "
                                 f"the inputs have {batch_size}")
            if (dtype, device) != (self.key_cache[0].dtype, self.key_cache[0].device):
                raise ValueError(f"past_key_values holds {self.key_cache[0].dtype} on "
                                 f"{self.key_cache[0].device}, the model computes {dtype} on {device}")
        required = needed if self.sliding_window is None else min(self.sliding_window, needed)
        if self.cache_lens is not None and self.capacity >= required:
            return
        shape = (batch_size, self._target_capacity(needed), self.num_kv_heads, self.head_dim)
        if not self.key_cache:
            self.key_cache, self.value_cache = [None] * self.num_layers, [None] * self.num_layers
            self.cache_lens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        for buffers in (self.key_cache, self.value_cache):
            for layer, old in enumerate(buffers):  # one layer at a time: small transient memory
                buffers[layer] = torch.zeros(shape, dtype=dtype, device=device)
                if old is not None:
                    buffers[layer][:, :old.shape[1]] = old

    def advance(self, positions: torch.Tensor) -> None:
        """Records a chunk written at `positions` [batch, tokens] (on the device, no sync)."""
        torch.maximum(self.cache_lens, positions[:, -1].to(torch.int32) + 1, out=self.cache_lens)
        self.seen_tokens += positions.shape[1]

    def __repr__(self) -> str:
        return (f"RollingCache(layers={self.num_layers}, batch={self.batch_size}, "
                f"capacity={self.capacity}, window={self.sliding_window}, seen={self.seen_tokens})")
