"""Sliding-window GQA attention: the reference against torch SDPA with an explicit boolean mask,
then our op (CPU, and CUDA when there is a GPU) against the reference.

Every case draws fresh random inputs. Empty cache slots and padding tokens are filled with NaN,
so reading one shows up in the output.
"""
import math

import pytest
import torch

from mistral_ext import ops, reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA GPU"))]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


def row_positions(starts, lengths, tokens):
    """int64 [B, tokens]: row b is left padding (-1) then starts[b] .. starts[b] + lengths[b] - 1."""
    rows = [[-1] * (tokens - n) + list(range(s, s + n)) for s, n in zip(starts, lengths)]
    return torch.tensor(rows, dtype=torch.int64)


class Case:
    """Random q/k/v for a chunk and a ring-buffer cache filled through reference.kv_cache_write_.

    cached[b] positions 0..cached[b]-1 of row b are written to a cache of `capacity` slots (so it
    wraps when cached[b] > capacity); the chunk of row b then holds positions cached[b] ..
    cached[b] + lengths[b] - 1, after tokens - lengths[b] padding tokens. Empty slots, padding
    tokens and padding queries are NaN. Built on the CPU, then moved to `device`.
    """

    def __init__(self, heads, kv_heads, head_dim, tokens, lengths, cached=None, capacity=0,
                 dtype=torch.float32, device="cpu"):
        batch = len(lengths)
        cached = cached or [0] * batch
        self.q = randn(batch, tokens, heads, head_dim, dtype=dtype)
        self.k = randn(batch, tokens, kv_heads, head_dim, dtype=dtype)
        self.v = randn(batch, tokens, kv_heads, head_dim, dtype=dtype)
        self.positions = row_positions(cached, lengths, tokens)
        padding = (self.positions < 0)[..., None, None]
        for t in (self.q, self.k, self.v):
            t.masked_fill_(padding, float("nan"))
        self.k_cache = self.v_cache = self.cache_lens = self.history = None
        if capacity > 0:
            self.k_cache = torch.full((batch, capacity, kv_heads, head_dim), float("nan"), dtype=dtype)
            self.v_cache = torch.full_like(self.k_cache, float("nan"))
            longest = max(max(cached), 1)
            history_pos = row_positions([0] * batch, cached, longest)
            history_k = randn(batch, longest, kv_heads, head_dim, dtype=dtype)
            history_v = randn(batch, longest, kv_heads, head_dim, dtype=dtype)
            reference.kv_cache_write_(self.k_cache, self.v_cache, history_k, history_v, history_pos)
            self.history = (history_k, history_v, history_pos)
            self.cache_lens = torch.tensor(cached, dtype=torch.int32)
        for name in ("q", "k", "v", "positions", "k_cache", "v_cache", "cache_lens"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        self.scale = 1.0 / math.sqrt(head_dim)

    def args(self, window):
        return (self.q, self.k, self.v, self.k_cache, self.v_cache, self.positions, self.cache_lens, window,
                self.scale)


def check_against_reference(case, window):
    out = ops.attention(*case.args(window))
    expected = reference.attention(*case.args(window))
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert not out.isnan().any()
    tol = TOLERANCE[case.q.dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)
    padding = case.positions < 0
    assert (out[padding] == 0).all()
    return out


# --- the reference itself, against SDPA with a mask built independently ------------------------

def test_reference_matches_sdpa_with_boolean_mask():
    torch.manual_seed(0)
    heads, kv_heads, head_dim, window, capacity = 6, 2, 16, 7, 7
    case = Case(heads, kv_heads, head_dim, tokens=12, lengths=[12, 9, 5], cached=[0, 4, 20], capacity=capacity)
    out = reference.attention(*case.args(window))

    history_k, history_v, history_pos = case.history
    for b in range(3):
        # Keys of row b: its whole history then its chunk; a key is visible to query i when it is
        # still in the ring buffer (one of the last `capacity` written) or in the chunk, and
        # i - window < j <= i.
        length = int(case.cache_lens[b])
        hist_keep = [t for t in range(history_pos.shape[1])
                     if 0 <= history_pos[b, t] and history_pos[b, t] >= length - capacity]
        key_pos = [int(history_pos[b, t]) for t in hist_keep] + case.positions[b].tolist()
        keys = torch.cat([history_k[b, hist_keep], case.k[b]]).nan_to_num(0.0)
        values = torch.cat([history_v[b, hist_keep], case.v[b]]).nan_to_num(0.0)
        mask = torch.zeros(case.q.shape[1], len(key_pos), dtype=torch.bool)
        for t, i in enumerate(case.positions[b].tolist()):
            for s, j in enumerate(key_pos):
                mask[t, s] = i >= 0 and j >= 0 and i - window < j <= i
        valid = case.positions[b] >= 0
        expected = torch.nn.functional.scaled_dot_product_attention(
            case.q[b, valid].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
            attn_mask=mask[valid], scale=case.scale, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(out[b, valid], expected, atol=1e-5, rtol=1e-5)
        assert (out[b, ~valid] == 0).all()


def test_reference_chunked_equals_one_shot():
    """Feeding a sequence in chunks through the ring buffer gives the one-shot result."""
    torch.manual_seed(1)
    window, total = 6, 23
    q, k, v = randn(1, total, 4, 8), randn(1, total, 2, 8), randn(1, total, 2, 8)
    positions = torch.arange(total)[None]
    full = reference.attention(q, k, v, None, None, positions, None, window, 0.3)
    k_cache, v_cache = torch.zeros(1, window, 2, 8), torch.zeros(1, window, 2, 8)
    lens = torch.zeros(1, dtype=torch.int32)
    for start, end in [(0, 4), (4, 5), (5, 15), (15, 23)]:
        sl = slice(start, end)
        out = reference.attention(q[:, sl], k[:, sl], v[:, sl], k_cache, v_cache, positions[:, sl], lens,
                                  window, 0.3)
        torch.testing.assert_close(out, full[:, sl])
        reference.kv_cache_write_(k_cache, v_cache, k[:, sl], v[:, sl], positions[:, sl])
        lens.fill_(end)


# --- our op against the reference ----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [16, 33])
def test_window_edges(device, window):
    # One prompt of window + 2 tokens: queries at positions W-1 (sees everything so far), W (first
    # to drop a key) and W+1; the rows before exercise the plain causal part.
    torch.manual_seed(window)
    case = Case(8, 2, 64, tokens=window + 2, lengths=[window + 2], device=device)
    check_against_reference(case, window)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prompt_of_three_windows(device, kv_heads, head_dim):
    torch.manual_seed(kv_heads * head_dim)
    window = 24
    case = Case(8, kv_heads, head_dim, tokens=3 * window, lengths=[3 * window, 3 * window - 5], device=device)
    check_against_reference(case, window)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(device, dtype):
    torch.manual_seed(3)
    case = Case(8, 2, 128, tokens=40, lengths=[40, 17], cached=[30, 3], capacity=32, dtype=dtype, device=device)
    check_against_reference(case, 32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cached,capacity,tokens", [
    ([10, 3], 32, 7),       # partially filled ring buffer
    ([50, 77], 32, 9),      # wrapped ring buffer
    ([40, 33], 32, 45),     # wrapped, and a chunk longer than the window
    ([0, 64], 32, 32),      # empty cache next to a full one, chunk of exactly W
])
def test_chunked_continuation(device, cached, capacity, tokens):
    torch.manual_seed(sum(cached) + tokens)
    case = Case(8, 2, 64, tokens=tokens, lengths=[tokens, tokens - 2], cached=cached, capacity=capacity,
                device=device)
    check_against_reference(case, capacity)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 550])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_over_long_cache_few_heads(device, window, dtype):
    """Batch 1 with 3 kv heads over ~700 keys: fewer work items than threads x 4, so the CPU kernel
    splits each item's keys into parts and merges them (flash-decoding); on CUDA, split-KV."""
    torch.manual_seed(11)
    case = Case(9, 3, 64, tokens=1, lengths=[1], cached=[700], capacity=600 if window else 704,
                dtype=dtype, device=device)
    check_against_reference(case, window)


@pytest.mark.parametrize("device", DEVICES)
def test_continuation_equals_one_shot(device):
    """Prefill in chunks with our cache write + attention: rows match a single call."""
    torch.manual_seed(5)
    window, total, heads, kv_heads, d = 16, 57, 4, 2, 64
    q, k, v = (randn(2, total, h, d, device=device) for h in (heads, kv_heads, kv_heads))
    positions = torch.arange(total, device=device).repeat(2, 1)
    full = ops.attention(q, k, v, None, None, positions, None, window, 0.125)
    torch.testing.assert_close(full, reference.attention(q, k, v, None, None, positions, None, window, 0.125),
                               atol=2e-5, rtol=2e-5)
    k_cache = torch.full((2, window, kv_heads, d), float("nan"), device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    lens = torch.zeros(2, dtype=torch.int32, device=device)
    for start, end in [(0, 5), (5, 6), (6, 30), (30, 31), (31, 57)]:
        q_c, k_c, v_c, pos_c = (t[:, start:end].contiguous() for t in (q, k, v, positions))
        out = ops.attention(q_c, k_c, v_c, k_cache, v_cache, pos_c, lens, window, 0.125)
        torch.testing.assert_close(out, full[:, start:end], atol=2e-5, rtol=2e-5)
        ops.kv_cache_write_(k_cache, v_cache, k_c, v_c, pos_c)
        lens.fill_(end)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_length_left_padded_batch(device, dtype):
    torch.manual_seed(6)
    case = Case(8, 2, 64, tokens=21, lengths=[21, 1, 13, 0], cached=[0, 40, 7, 12], capacity=24, dtype=dtype,
                device=device)
    check_against_reference(case, 24)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cached", [[5, 16, 200], [300, 1, 31]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step(device, cached, dtype):
    torch.manual_seed(cached[0])
    case = Case(32, 8, 128, tokens=1, lengths=[1, 1, 1], cached=cached, capacity=32, dtype=dtype, device=device)
    check_against_reference(case, 32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [1, 3])
def test_no_window(device, tokens):
    # window None: plain causal over a cache large enough for the whole sequence.
    torch.manual_seed(tokens)
    case = Case(9, 3, 64, tokens=tokens, lengths=[tokens, tokens], cached=[90, 7], capacity=128, device=device)
    check_against_reference(case, None)
    prompt = Case(9, 3, 64, tokens=50, lengths=[50, 20], device=device)
    check_against_reference(prompt, None)


def test_odd_head_dim_on_cpu():
    torch.manual_seed(8)
    for head_dim in (80, 17):
        case = Case(6, 3, head_dim, tokens=20, lengths=[20, 11], cached=[9, 30], capacity=16)
        check_against_reference(case, 16)


@pytest.mark.parametrize("device", DEVICES)
def test_column_slices_of_fused_qkv(device):
    torch.manual_seed(9)
    batch, tokens, heads, kv_heads, d = 2, 19, 8, 2, 64
    qkv = randn(batch, tokens, (heads + 2 * kv_heads) * d, device=device)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k, v = q.view(batch, tokens, heads, d), k.view(batch, tokens, kv_heads, d), v.view(batch, tokens, kv_heads, d)
    positions = torch.arange(tokens, device=device).repeat(batch, 1)
    args = (q, k, v, None, None, positions, None, 8, 0.125)
    torch.testing.assert_close(ops.attention(*args), reference.attention(*args), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    torch.manual_seed(10)
    case = Case(4, 2, 64, tokens=5, lengths=[5, 3], cached=[6, 2], capacity=8, device=device)
    for t in (case.q, case.k, case.v, case.k_cache, case.v_cache):
        t.nan_to_num_(0.0)
    torch.library.opcheck(torch.ops.mistral_ext.attention.default, case.args(8))
    torch.library.opcheck(torch.ops.mistral_ext.attention.default, case.args(0)[:3] + (None, None) +
                          (case.positions, None, 0, 0.125))


# --- CUDA-only: the split-KV decode path and long prefill tiles ----------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_cuda_split_kv_decode_long_cache(batch, head_dim):
    torch.manual_seed(batch * head_dim)
    window = 4096
    cached = [window + 100 + 37 * b for b in range(batch)]
    case = Case(32, 8, head_dim, tokens=1, lengths=[1] * batch, cached=cached, capacity=window,
                dtype=torch.bfloat16, device="cuda")
    check_against_reference(case, window)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="launches overlap from compute capability 9.0 on")
def test_cuda_decode_steps_with_overlapping_launches(monkeypatch):
    """MISTRAL_EXT_PDL=1: decode steps of RoPE + cache write, then attention over a wrapped 4096-slot
    cache (split-KV and its combine kernel), each step's query the previous step's output, every
    kernel free to start while the one before it runs: the outputs of serial launches (the same
    kernels and sums; a read before the wait would see stale data), and the reference's."""
    monkeypatch.delenv("MISTRAL_EXT_PDL", raising=False)
    torch.manual_seed(12)
    window, cached, steps = 4096, 4196, 6
    case = Case(32, 8, 128, tokens=1, lengths=[1], cached=[cached], capacity=window, dtype=torch.bfloat16,
                device="cuda")
    new_kv = [(randn(1, 1, 8, 128, dtype=torch.bfloat16, device="cuda"),
               randn(1, 1, 8, 128, dtype=torch.bfloat16, device="cuda")) for _ in range(steps)]
    positions = [torch.full((1, 1), cached + t, device="cuda") for t in range(steps)]
    lens = [torch.full((1,), cached + t, dtype=torch.int32, device="cuda") for t in range(steps)]

    def decode(impl):
        q, k_cache, v_cache = case.q.clone(), case.k_cache.clone(), case.v_cache.clone()
        for (k, v), position, cache_len in zip(new_kv, positions, lens):
            k, v = k.clone(), v.clone()
            impl.rotary_embedding_cache_write_(q, k, v, k_cache, v_cache, position, 10000.0)
            q = impl.attention(q, k, v, k_cache, v_cache, position, cache_len, window, 128 ** -0.5)
        return q

    serial = decode(ops)
    monkeypatch.setenv("MISTRAL_EXT_PDL", "1")
    torch.cuda._sleep(50_000_000)  # holds the stream while the steps are queued: the launches can overlap
    assert torch.equal(decode(ops), serial)
    want = decode(reference).float()
    assert ((serial.float() - want).norm() / want.norm()).item() < TOLERANCE[torch.bfloat16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_long_prefill(dtype):
    torch.manual_seed(11)
    case = Case(32, 8, 128, tokens=700, lengths=[700, 513], cached=[0, 40], capacity=256, dtype=dtype,
                device="cuda")
    check_against_reference(case, 256)


# --- CUDA-only: the Hopper (sm_90a, wgmma) prefill kernel ---------------------------------------

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def launched_kernels(fn):
    """Names of the CUDA kernels fn() launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {event.name for event in prof.events()}


@pytest.mark.skipif(not HOPPER, reason="needs a compute capability 9.0 GPU")
@pytest.mark.parametrize("heads,kv_heads,tokens,lengths,cached,capacity,window,dtype", [
    (32, 8, 700, [700, 513], [0, 40], 256, 256, torch.bfloat16),        # windowed prompt, cache, padding
    (32, 8, 1100, [1100], [0], 0, None, torch.float16),                  # plain causal
    (8, 8, 300, [300, 299], [0, 0], 0, 100, torch.bfloat16),             # group 1
    (8, 1, 50, [50, 17], [130, 0], 64, 64, torch.float16),               # group 8, wrapped ring buffer
    (32, 8, 40, [40], [5000], 4096, 4096, torch.bfloat16),               # split-KV over a long cache
    (32, 8, 3, [3, 2], [2000, 4500], 4096, 4096, torch.bfloat16),        # 12 rows: just above decode
    (32, 8, 30, [30, 0], [0, 9], 32, 32, torch.bfloat16),                # a row of padding only
])
def test_cuda_sm90_prefill(monkeypatch, heads, kv_heads, tokens, lengths, cached, capacity, window, dtype):
    monkeypatch.delenv("MISTRAL_EXT_SM90_ATTENTION", raising=False)  # the default on Hopper
    torch.manual_seed(tokens + capacity)
    case = Case(heads, kv_heads, 128, tokens=tokens, lengths=lengths, cached=cached, capacity=capacity,
                dtype=dtype, device="cuda")
    check_against_reference(case, window)
    kernels = launched_kernels(lambda: ops.attention(*case.args(window)))
    assert any("flash_attention_sm90_kernel" in name for name in kernels), kernels


@pytest.mark.skipif(not HOPPER, reason="needs a compute capability 9.0 GPU")
def test_cuda_sm90_kernel_can_be_turned_off(monkeypatch):
    """MISTRAL_EXT_SM90_ATTENTION=0: prefill takes the mma.sync kernel, with the same results."""
    monkeypatch.setenv("MISTRAL_EXT_SM90_ATTENTION", "0")
    torch.manual_seed(3)
    case = Case(32, 8, 128, tokens=64, lengths=[64], dtype=torch.bfloat16, device="cuda")
    check_against_reference(case, None)
    kernels = launched_kernels(lambda: ops.attention(*case.args(None)))
    assert not any("sm90" in name for name in kernels) and any("flash_attention_kernel" in n for n in kernels), kernels


# --- bad input ----------------------------------------------------------------------------------

def good_args(**changes):
    case = Case(8, 2, 64, tokens=4, lengths=[4, 4], cached=[3, 5], capacity=8)
    args = dict(q=case.q, k=case.k, v=case.v, k_cache=case.k_cache, v_cache=case.v_cache,
                positions=case.positions, cache_lens=case.cache_lens, window=8, scale=0.125)
    args.update(changes)
    return args


@pytest.mark.parametrize("change,error,match", [
    (lambda a: dict(q=a["q"][:, :, :7]), ValueError, "num_heads"),
    (lambda a: dict(q=randn(2, 4, 8, 300), k=randn(2, 4, 2, 300), v=randn(2, 4, 2, 300)), ValueError,
     "head_dim"),
    (lambda a: dict(k=a["k"][:, :, :, :32].contiguous()), ValueError, "k's head_dim"),
    (lambda a: dict(v=a["v"][:, :3].contiguous()), ValueError, "v's batch and tokens"),
    (lambda a: dict(q=a["q"].half()), TypeError, "k has dtype"),
    (lambda a: dict(q=a["q"].long(), k=a["k"].long(), v=a["v"].long()), TypeError, "q must be float32"),
    (lambda a: dict(k_cache=a["k_cache"].half()), TypeError, "k_cache has dtype"),
    (lambda a: dict(k_cache=a["k_cache"][:, :, :1]), ValueError, "k_cache must have shape"),
    (lambda a: dict(v_cache=a["v_cache"][:, :4].contiguous()), ValueError, "v_cache shape"),
    (lambda a: dict(k_cache=a["k_cache"].transpose(0, 1).contiguous().transpose(0, 1)), ValueError,
     "k_cache must be contiguous"),
    (lambda a: dict(v_cache=None), ValueError, "both be given"),
    (lambda a: dict(cache_lens=None), ValueError, "cache_lens is required"),
    (lambda a: dict(cache_lens=a["cache_lens"].long()), TypeError, "cache_lens must be int32"),
    (lambda a: dict(cache_lens=a["cache_lens"][:1]), ValueError, "cache_lens must have shape"),
    (lambda a: dict(cache_lens=a["cache_lens"] + 1), ValueError, r"cache_lens\[0\]"),
    (lambda a: dict(cache_lens=a["cache_lens"] - 4), ValueError, "cache_lens\\[0\\] must be >= 0"),
    (lambda a: dict(positions=a["positions"].int()), TypeError, "positions must be int64"),
    (lambda a: dict(positions=a["positions"][:, :3]), ValueError, "positions must have shape"),
    (lambda a: dict(positions=a["positions"].flip(1)), ValueError, "positions of row 0"),
    (lambda a: dict(scale=float("inf")), ValueError, "scale"),
])
def test_bad_input(change, error, match):
    torch.manual_seed(12)
    args = good_args()
    args.update(change(args))
    with pytest.raises(error, match=match):
        ops.attention(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bad_input_cuda():
    args = good_args()
    with pytest.raises(ValueError, match="k is on"):
        ops.attention(**dict(args, q=args["q"].cuda()))
    cuda = {name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in args.items()}
    with pytest.raises(ValueError, match="positions is on"):
        ops.attention(**dict(cuda, positions=args["positions"]))
    with pytest.raises(ValueError, match="head_dim must be 64, 96 or 128 on CUDA"):
        ops.attention(**dict(cuda, q=cuda["q"][..., :48].contiguous(), k=cuda["k"][..., :48].contiguous(),
                             v=cuda["v"][..., :48].contiguous(), k_cache=None, v_cache=None))
