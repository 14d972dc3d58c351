"""The non-attention ops (rms_norm, fused_add_rms_norm, rotary_embedding_, silu_and_mul,
kv_cache_write_, rotary_embedding_cache_write_, linear) and decoder_layer, which chains them:
kernels against mistral_ext.reference (and the fused op against the two kernels it fuses),
reference against independent math (torch.nn.functional, complex rotation, transformers' RoPE,
hand-computed cache slots), schema and fake-impl checks (opcheck, torch.compile), and bad input
raising errors that name the argument.
"""
import pytest
import torch
import torch.nn.functional as F

from mistral_ext import ops, reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Kernel vs reference: both compute in fp32 and round once, so 16-bit results may differ by one
# ulp of the storage type (summation order, sin/cos/exp implementations); fp32 in the last bits.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=3e-5),
    torch.float16: dict(atol=1e-5, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-5, rtol=1.6e-2),
}


@pytest.fixture(autouse=True)
def fp32_gemm_reductions():
    """cuBLAS reduces in fp32, as our kernels do: by default torch lets it reduce fp16 / bf16
    partial sums in 16 bits, a few ulps off at K = 577 (linear beyond one row on CUDA)."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_fp16_reduced_precision_reduction = matmul.allow_bf16_reduced_precision_reduction = False
    yield
    matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction = saved


def rand(*shape, dtype=torch.float32, device="cpu"):
    """Uniform magnitudes in [0.05, 2) with random signs: never zero."""
    magnitude = torch.rand(shape, device=device) * 1.95 + 0.05
    sign = torch.randint(0, 2, shape, device=device) * 2 - 1
    return (magnitude * sign).to(dtype)


def left_padded_positions(batch, tokens, starts, device="cpu"):
    """Row b counts up from starts[b % len(starts)]; negative positions are left padding."""
    start = torch.tensor([starts[b % len(starts)] for b in range(batch)], device=device)
    return start[:, None] + torch.arange(tokens, device=device)


# Left padding, a fresh sequence, continuation past a 4096 window, 128k context and beyond.
ROTARY_STARTS = [-3, 0, 4090, 131069, 999_998]


# --------------------------------------------------------------------------------------------
# Kernels vs reference

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 7, 33, 4096, 4097])
def test_rms_norm(device, dtype, hidden):
    x, w = rand(2, 3, hidden, dtype=dtype, device=device), rand(hidden, dtype=dtype, device=device)
    out = ops.rms_norm(x, w, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, reference.rms_norm(x, w, 1e-5), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 7, 33, 4097])
def test_rms_norm_strided_rows(device, dtype, hidden):
    wide = rand(5, hidden + 9, dtype=dtype, device=device)
    x = wide[:, 3:3 + hidden]  # rows of a wider tensor: row stride hidden + 9, misaligned start
    w = rand(hidden, dtype=dtype, device=device)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 7, 33, 4096, 4097])
def test_fused_add_rms_norm(device, dtype, hidden):
    x, residual = rand(3, 2, hidden, dtype=dtype, device=device), rand(3, 2, hidden, dtype=dtype, device=device)
    w = rand(hidden, dtype=dtype, device=device)
    x_before, residual_before = x.clone(), residual.clone()
    out, summed = ops.fused_add_rms_norm(x, residual, w, 1e-6)
    want_out, want_summed = reference.fused_add_rms_norm(x, residual, w, 1e-6)
    torch.testing.assert_close(summed, want_summed, atol=0, rtol=0)  # one rounding of an fp32 sum
    torch.testing.assert_close(out, want_out, **TOL[dtype])
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def split_qkv(qkv, heads, kv_heads, head_dim):
    """q, k, v as column views of a fused [batch, tokens, (heads + 2 kv_heads) * head_dim + pad] output."""
    q_cols, kv_cols = heads * head_dim, kv_heads * head_dim
    q = qkv[..., :q_cols].unflatten(-1, (heads, head_dim))
    k = qkv[..., q_cols:q_cols + kv_cols].unflatten(-1, (kv_heads, head_dim))
    v = qkv[..., q_cols + kv_cols:q_cols + 2 * kv_cols].unflatten(-1, (kv_heads, head_dim))
    return q, k, v


def fused_qkv(batch, tokens, heads, kv_heads, head_dim, pad, dtype, device):
    return rand(batch, tokens, (heads + 2 * kv_heads) * head_dim + pad, dtype=dtype, device=device)


ROTARY_SHAPES = [  # heads, kv_heads, head_dim, pad
    (4, 2, 64, 0), (4, 2, 96, 0), (3, 1, 128, 0), (32, 8, 128, 0), (4, 4, 128, 5),
    (2, 1, 2, 0), (2, 1, 6, 1), (1, 1, 256, 0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,pad", ROTARY_SHAPES)
def test_rotary_embedding_fused_qkv(device, dtype, heads, kv_heads, head_dim, pad):
    batch, tokens = 5, 3
    qkv = fused_qkv(batch, tokens, heads, kv_heads, head_dim, pad, dtype, device)
    q, k, v = split_qkv(qkv, heads, kv_heads, head_dim)
    positions = left_padded_positions(batch, tokens, ROTARY_STARTS, device)
    theta = 1e6 if head_dim == 96 else 10000.0
    want = qkv.clone()
    want_q, want_k, _ = split_qkv(want, heads, kv_heads, head_dim)
    reference.rotary_embedding_(want_q, want_k, positions, theta)
    v_before = v.clone()
    ops.rotary_embedding_(q, k, positions, theta)
    torch.testing.assert_close(qkv, want, **TOL[dtype])
    assert torch.equal(v, v_before)
    padding = positions < 0
    assert torch.equal(q[padding], want_q[padding]) and torch.equal(k[padding], want_k[padding])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,tokens", [(1, 1), (4, 1), (2, 9)])
def test_rotary_embedding_contiguous(device, dtype, batch, tokens):
    q = rand(batch, tokens, 8, 128, dtype=dtype, device=device)
    k = rand(batch, tokens, 2, 128, dtype=dtype, device=device)
    positions = left_padded_positions(batch, tokens, [-4, 7, 70_000, 4095], device)
    want_q, want_k = q.clone(), k.clone()
    reference.rotary_embedding_(want_q, want_k, positions, 10000.0)
    ops.rotary_embedding_(q, k, positions, 10000.0)
    torch.testing.assert_close(q, want_q, **TOL[dtype])
    torch.testing.assert_close(k, want_k, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [1, 7, 33, 4097, 14336])
def test_silu_and_mul(device, dtype, inter):
    x = rand(2, 3, 2 * inter, dtype=dtype, device=device)
    out = ops.silu_and_mul(x)
    assert out.shape == (2, 3, inter) and out.dtype == dtype
    torch.testing.assert_close(out, reference.silu_and_mul(x), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_extreme_gates(device, dtype):
    """Gates where exp(-gate) underflows, overflows or is not finite (the CPU's exp is a clamped
    polynomial): the values of the formula, NaN where it gives NaN (gate -inf: -inf / inf)."""
    gate = torch.tensor([-100.0, -88.6, -87.5, -30.0, -1e-30, 0.0, 1e-30, 30.0, 87.5, 88.6, 100.0,
                         float("inf"), float("-inf"), float("nan")], device=device)
    x = torch.cat([gate, rand(len(gate), device=device)])[None].to(dtype)
    torch.testing.assert_close(ops.silu_and_mul(x), reference.silu_and_mul(x), equal_nan=True, **TOL[dtype])


KV_CASES = [  # batch, tokens, kv_heads, head_dim, capacity, row starts
    (3, 6, 2, 64, 4, [-2, 4090, -100]),     # left padding; chunk longer than the buffer; all padding
    (2, 5, 8, 128, 16, [0, 11]),            # prefill into a roomy buffer, with wrap-around
    (4, 1, 8, 128, 7, [-1, 6, 7, 131071]),  # decode steps
    (2, 3, 3, 5, 4, [1, 2]),                # odd head_dim
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,tokens,kv_heads,head_dim,capacity,starts", KV_CASES)
@pytest.mark.parametrize("fused", [False, True])
def test_kv_cache_write(device, dtype, batch, tokens, kv_heads, head_dim, capacity, starts, fused):
    if fused:  # k and v as column views of a fused projection output
        _, key, value = split_qkv(fused_qkv(batch, tokens, 2, kv_heads, head_dim, 3, dtype, device), 2, kv_heads,
                                  head_dim)
    else:
        key = rand(batch, tokens, kv_heads, head_dim, dtype=dtype, device=device)
        value = rand(batch, tokens, kv_heads, head_dim, dtype=dtype, device=device)
    k_cache = rand(batch, capacity, kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = rand(batch, capacity, kv_heads, head_dim, dtype=dtype, device=device)
    positions = left_padded_positions(batch, tokens, starts, device)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.kv_cache_write_(want_k, want_v, key, value, positions)
    ops.kv_cache_write_(k_cache, v_cache, key, value, positions)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


ROTARY_CACHE_CASES = [  # batch, tokens, heads, kv_heads, head_dim, capacity, row starts
    (3, 1, 5, 1, 64, 7, [-1, 6, 131071]),      # decode: a padding row, wrapped rings, odd head count
    (4, 1, 32, 8, 128, 16, [15, 16, 4095, 0]),  # decode, Mistral's heads, around a wrap
    (2, 6, 3, 3, 128, 4, [-2, 4090]),           # left padding; chunk longer than the ring (write skips)
    (2, 3, 3, 1, 6, 5, [1, 999_998]),           # tiny head_dim (odd half), far positions
    (3, 2, 2, 1, 96, 3, [-2, 9, 4]),            # a row of padding only; head_dim 96
    (2, 1, 1, 1, 256, 2, [0, 7]),               # head_dim 256
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,tokens,heads,kv_heads,head_dim,capacity,starts", ROTARY_CACHE_CASES)
@pytest.mark.parametrize("layout", ["fused_qkv", "contiguous"])
def test_rotary_embedding_cache_write(device, dtype, batch, tokens, heads, kv_heads, head_dim, capacity, starts,
                                      layout):
    if layout == "fused_qkv":  # q, k, v: column views of one projection output, as the model makes them
        q, k, v = split_qkv(fused_qkv(batch, tokens, heads, kv_heads, head_dim, 3, dtype, device), heads, kv_heads,
                            head_dim)
    else:
        q = rand(batch, tokens, heads, head_dim, dtype=dtype, device=device)
        k, v = (rand(batch, tokens, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2))
    caches = [rand(batch, capacity, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2)]
    positions = left_padded_positions(batch, tokens, starts, device)
    theta = 1e6 if head_dim == 96 else 10000.0
    v_before = v.clone()

    want = [t.clone() for t in (q, k, *caches)]  # reference: rotary, then the cache write
    reference.rotary_embedding_(want[0], want[1], positions, theta)
    reference.kv_cache_write_(want[2], want[3], want[1], v, positions)
    unfused = [t.clone() for t in (q, k, *caches)]  # our two kernels one after the other
    ops.rotary_embedding_(unfused[0], unfused[1], positions, theta)
    ops.kv_cache_write_(unfused[2], unfused[3], unfused[1], v, positions)

    ops.rotary_embedding_cache_write_(q, k, v, *caches, positions, theta)
    for got, expected, name in zip((q, k, *caches), want, ("query", "key", "k_cache", "v_cache")):
        torch.testing.assert_close(got, expected, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    for got, expected, name in zip((q, k, *caches), unfused, ("query", "key", "k_cache", "v_cache")):
        assert torch.equal(got, expected), f"{name}: fused and unfused kernels differ"  # same arithmetic
    assert torch.equal(v, v_before)
    padding = positions < 0
    assert torch.equal(q[padding], want[0][padding]) and torch.equal(k[padding], want[1][padding])


# --------------------------------------------------------------------------------------------
# Schema, fake implementations, torch.compile

def opcheck_cases(device):
    x, w = rand(3, 33, device=device), rand(33, device=device)
    q, k = rand(2, 3, 4, 64, device=device), rand(2, 3, 2, 64, device=device)
    positions = left_padded_positions(2, 3, [-1, 5000], device)
    caches = rand(2, 4, 2, 64, device=device), rand(2, 4, 2, 64, device=device)
    value = rand(2, 3, 2, 64, device=device)
    m = torch.ops.mistral_ext
    return [
        (m.rms_norm.default, (x, w, 1e-6)),
        (m.fused_add_rms_norm.default, (x, rand(3, 33, device=device), w, 1e-6)),
        (m.rotary_embedding_.default, (q, k, positions, 10000.0)),
        (m.silu_and_mul.default, (rand(3, 34, device=device),)),
        (m.kv_cache_write_.default, (*caches, k, value, positions)),
        (m.rotary_embedding_cache_write_.default, (q, k, value, *caches, positions, 10000.0)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(6))
def test_opcheck(device, case):
    op, args = opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


def decoder_step(x, residual, weight, qkv, positions, k_cache, v_cache, gate_up,
                 heads: int, kv_heads: int, head_dim: int):
    """Every op once, the way a decoder layer chains them (q/k/v as views of a fused output)."""
    normed, residual = ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    q, k, v = split_qkv(qkv, heads, kv_heads, head_dim)
    ops.rotary_embedding_(q, k, positions, 10000.0)
    ops.kv_cache_write_(k_cache, v_cache, k, v, positions)
    return ops.rms_norm(normed, weight, 1e-6), residual, q * 1, ops.silu_and_mul(gate_up)


def test_torch_compile_fullgraph():
    batch, tokens, heads, kv_heads, head_dim, hidden = 2, 3, 4, 2, 64, 40

    eager_inputs = (rand(batch, tokens, hidden), rand(batch, tokens, hidden), rand(hidden),
                    rand(batch, tokens, (heads + 2 * kv_heads) * head_dim),
                    left_padded_positions(batch, tokens, [-1, 4094]),
                    rand(batch, 4, kv_heads, head_dim), rand(batch, 4, kv_heads, head_dim),
                    rand(batch, tokens, 2 * 48))
    compiled_inputs = tuple(t.clone() for t in eager_inputs)
    eager = decoder_step(*eager_inputs, heads, kv_heads, head_dim)
    compiled = torch.compile(decoder_step, fullgraph=True)(*compiled_inputs, heads, kv_heads, head_dim)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    for got, want in zip(compiled_inputs, eager_inputs):  # the in-place updates happened too
        assert torch.equal(got, want)


def decode_rotary_cache_write(qkv, positions, k_cache, v_cache, heads: int, kv_heads: int, head_dim: int):
    """The model's decode step: the fused op on q, k, v views of one projection output."""
    q, k, v = split_qkv(qkv, heads, kv_heads, head_dim)
    ops.rotary_embedding_cache_write_(q, k, v, k_cache, v_cache, positions, 10000.0)
    return q * 1


def test_torch_compile_rotary_embedding_cache_write():
    batch, heads, kv_heads, head_dim = 3, 4, 2, 64
    eager_inputs = (rand(batch, 1, (heads + 2 * kv_heads) * head_dim), left_padded_positions(batch, 1, [-1, 4, 9]),
                    rand(batch, 5, kv_heads, head_dim), rand(batch, 5, kv_heads, head_dim))
    compiled_inputs = tuple(t.clone() for t in eager_inputs)
    eager = decode_rotary_cache_write(*eager_inputs, heads, kv_heads, head_dim)
    compiled = torch.compile(decode_rotary_cache_write, fullgraph=True)(*compiled_inputs, heads, kv_heads, head_dim)
    assert torch.equal(compiled, eager)
    for got, want in zip(compiled_inputs, eager_inputs):  # qkv and both caches updated in place
        assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# The reference against independent formulations

@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_rms_norm_matches_functional(dtype):
    x, w = rand(4, 7, 33, dtype=dtype), rand(33, dtype=dtype)
    want = F.rms_norm(x.double(), (33,), w.double(), 1e-5).to(dtype)
    torch.testing.assert_close(reference.rms_norm(x, w, 1e-5), want, **TOL[dtype])
    residual = rand(4, 7, 33, dtype=dtype)
    normed, summed = reference.fused_add_rms_norm(x, residual, w, 1e-5)
    torch.testing.assert_close(summed, (x.double() + residual.double()).to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(normed, F.rms_norm(summed.double(), (33,), w.double(), 1e-5).to(dtype), **TOL[dtype])


@pytest.mark.parametrize("head_dim", [2, 64, 96, 128])
def test_reference_rotary_matches_complex_rotation(head_dim):
    """Rotate-half RoPE = multiplying z_i = x[i] + 1j * x[i + D/2] by exp(1j * angle_i)."""
    theta = 10000.0
    q, k = rand(3, 4, 5, head_dim), rand(3, 4, 2, head_dim)
    positions = left_padded_positions(3, 4, [-2, 4093, 131070])
    inv_freq = torch.tensor([theta ** (-2 * i / head_dim) for i in range(head_dim // 2)], dtype=torch.float32)
    angle = (positions.float()[..., None] * inv_freq).double()  # the documented fp32 angle

    def rotated(x):
        half = head_dim // 2
        z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(
            torch.ones_like(angle), angle)[:, :, None, :]
        out = torch.cat([z.real, z.imag], dim=-1).float()
        return torch.where((positions >= 0)[..., None, None], out, x)

    want_q, want_k = rotated(q), rotated(k)
    reference.rotary_embedding_(q, k, positions, theta)
    torch.testing.assert_close(q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, want_k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim,theta", [(128, 10000.0), (64, 1e6), (96, 10000.0)])
def test_reference_rotary_matches_transformers(head_dim, theta):
    modeling = pytest.importorskip("transformers.models.mistral.modeling_mistral")
    from transformers import MistralConfig

    heads, kv_heads = 4, 2
    config = MistralConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                           head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": theta})
    rotary = modeling.MistralRotaryEmbedding(config)
    torch.testing.assert_close(rotary.inv_freq, reference.rope_inv_freq(head_dim, theta), atol=0, rtol=1e-6)
    # transformers rounds its fp32 inverse frequencies differently in the last bit, an error that
    # grows with the position; with ours in its buffer the two must agree at any position.
    rotary.inv_freq.copy_(reference.rope_inv_freq(head_dim, theta))
    q, k = rand(3, 6, heads, head_dim), rand(3, 6, kv_heads, head_dim)
    positions = left_padded_positions(3, 6, [0, 4093, 131069])
    cos, sin = rotary(q, positions)
    want_q, want_k = modeling.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    reference.rotary_embedding_(q, k, positions, theta)
    torch.testing.assert_close(q, want_q.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, want_k.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_reference_silu_and_mul_matches_formula():
    x = rand(3, 2 * 17, dtype=torch.float64)
    gate, up = x[:, :17], x[:, 17:]
    torch.testing.assert_close(reference.silu_and_mul(x), gate * torch.sigmoid(gate) * up)


def test_reference_kv_cache_write_by_hand():
    # Row 0: padding then positions 0..3 in a 3-slot buffer: position 0 is overwritten by 3
    # (slot 0), 1 -> slot 1, 2 -> slot 2. Row 1: all padding, its buffer stays as it was.
    key = torch.tensor([[10., 20., 30., 40., 50.], [1., 2., 3., 4., 5.]]).reshape(2, 5, 1, 1)
    positions = torch.tensor([[-1, 0, 1, 2, 3], [-5, -4, -3, -2, -1]])
    k_cache, v_cache = torch.full((2, 3, 1, 1), -7.0), torch.full((2, 3, 1, 1), -7.0)
    reference.kv_cache_write_(k_cache, v_cache, key, -key, positions)
    assert k_cache.flatten().tolist() == [50., 30., 40., -7., -7., -7.]
    assert v_cache.flatten().tolist() == [-50., -30., -40., -7., -7., -7.]


# --------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument

BAD = (TypeError, ValueError)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_bad_input(device):
    x, w = rand(3, 8, device=device), rand(8, device=device)
    with pytest.raises(BAD, match="weight"):
        ops.rms_norm(x, w.double(), 1e-6)
    with pytest.raises(BAD, match="weight"):
        ops.rms_norm(x, rand(9, device=device), 1e-6)
    with pytest.raises(BAD, match="weight"):
        ops.rms_norm(x, rand(1, 8, device=device), 1e-6)
    with pytest.raises(BAD, match="input"):
        ops.rms_norm(torch.ones(3, 8, dtype=torch.int32, device=device), w, 1e-6)
    with pytest.raises(BAD, match="input"):  # 3-D with strided rows
        ops.rms_norm(rand(2, 3, 16, device=device)[..., :8], w, 1e-6)
    with pytest.raises(BAD, match="input"):
        ops.rms_norm(rand(8, 3, device=device).t(), rand(3, device=device), 1e-6)
    with pytest.raises(BAD, match="eps"):
        ops.rms_norm(x, w, -1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_add_rms_norm_bad_input(device):
    x, residual, w = rand(3, 8, device=device), rand(3, 8, device=device), rand(8, device=device)
    with pytest.raises(BAD, match="residual"):
        ops.fused_add_rms_norm(x, rand(3, 9, device=device), w, 1e-6)
    with pytest.raises(BAD, match="residual"):
        ops.fused_add_rms_norm(x, residual.bfloat16(), w, 1e-6)
    with pytest.raises(BAD, match="residual"):
        ops.fused_add_rms_norm(x, rand(3, 16, device=device)[:, :8], w, 1e-6)
    with pytest.raises(BAD, match="input"):
        ops.fused_add_rms_norm(rand(3, 16, device=device)[:, :8], residual, w, 1e-6)
    with pytest.raises(BAD, match="weight"):
        ops.fused_add_rms_norm(x, residual, rand(7, device=device), 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_embedding_bad_input(device):
    q, k = rand(2, 3, 4, 64, device=device), rand(2, 3, 2, 64, device=device)
    positions = torch.arange(3, device=device).expand(2, 3).contiguous()
    for bad_q, bad_k, name in [
        (rand(2, 3, 4, 7, device=device), rand(2, 3, 2, 7, device=device), "head_dim"),
        (rand(2, 3, 1, 258, device=device), rand(2, 3, 1, 258, device=device), "head_dim"),
        (q, rand(2, 3, 2, 32, device=device), "key"),
        (q, rand(2, 4, 2, 64, device=device), "key"),
        (q, k.bfloat16(), "key"),
        (rand(2, 3, 256, device=device), k, "query"),
        (q.int(), k, "query"),
        (rand(2, 3, 64, 4, device=device).transpose(2, 3), k, "query"),
    ]:
        with pytest.raises(BAD, match=name):
            ops.rotary_embedding_(bad_q, bad_k, positions, 10000.0)
    with pytest.raises(BAD, match="positions"):
        ops.rotary_embedding_(q, k, positions.int(), 10000.0)
    with pytest.raises(BAD, match="positions"):
        ops.rotary_embedding_(q, k, positions[:, :2].contiguous(), 10000.0)
    with pytest.raises(BAD, match="positions"):
        ops.rotary_embedding_(q, k, positions.flatten(), 10000.0)
    with pytest.raises(BAD, match="theta"):
        ops.rotary_embedding_(q, k, positions, 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_mul_bad_input(device):
    with pytest.raises(BAD, match="input"):
        ops.silu_and_mul(rand(3, 7, device=device))
    with pytest.raises(BAD, match="input"):
        ops.silu_and_mul(rand(3, 16, device=device)[:, :8])
    with pytest.raises(BAD, match="input"):
        ops.silu_and_mul(torch.ones(3, 8, dtype=torch.int64, device=device))
    with pytest.raises(BAD, match="input"):
        ops.silu_and_mul(torch.tensor(1.0, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_write_bad_input(device):
    k_cache, v_cache = rand(2, 4, 2, 8, device=device), rand(2, 4, 2, 8, device=device)
    key, value = rand(2, 3, 2, 8, device=device), rand(2, 3, 2, 8, device=device)
    positions = torch.arange(3, device=device).expand(2, 3).contiguous()
    for args, name in [
        ((rand(2, 4, 16, device=device), rand(2, 4, 16, device=device), key, value, positions), "k_cache"),
        ((k_cache, rand(2, 5, 2, 8, device=device), key, value, positions), "v_cache"),
        ((k_cache, v_cache.bfloat16(), key, value, positions), "v_cache"),
        ((rand(2, 0, 2, 8, device=device), rand(2, 0, 2, 8, device=device), key, value, positions), "k_cache"),
        ((rand(2, 2, 4, 8, device=device).transpose(1, 2), v_cache, key, value, positions), "k_cache"),
        ((k_cache, v_cache, rand(2, 3, 3, 8, device=device), value, positions), "key"),
        ((k_cache, v_cache, rand(3, 3, 2, 8, device=device), value, positions), "key"),
        ((k_cache, v_cache, key.bfloat16(), value, positions), "key"),
        ((k_cache, v_cache, key, rand(2, 2, 2, 8, device=device), positions), "value"),
        ((k_cache, v_cache, key, rand(2, 3, 2, 4, device=device), positions), "value"),
        ((k_cache, v_cache, key, value, positions.int()), "positions"),
        ((k_cache, v_cache, key, value, positions[:1]), "positions"),
    ]:
        with pytest.raises(BAD, match=name):
            ops.kv_cache_write_(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_embedding_cache_write_bad_input(device):
    q, k, v = rand(2, 3, 4, 8, device=device), rand(2, 3, 2, 8, device=device), rand(2, 3, 2, 8, device=device)
    k_cache, v_cache = rand(2, 4, 2, 8, device=device), rand(2, 4, 2, 8, device=device)
    positions = torch.arange(3, device=device).expand(2, 3).contiguous()
    good = dict(query=q, key=k, value=v, k_cache=k_cache, v_cache=v_cache, positions=positions, theta=10000.0)
    before = {name: t.clone() for name, t in good.items() if isinstance(t, torch.Tensor)}
    for changes, name in [
        (dict(query=rand(2, 3, 4, 7, device=device), key=rand(2, 3, 2, 7, device=device),
              value=rand(2, 3, 2, 7, device=device), k_cache=rand(2, 4, 2, 7, device=device),
              v_cache=rand(2, 4, 2, 7, device=device)), "head_dim"),             # odd head_dim
        (dict(query=q.int()), "query"),
        (dict(query=rand(2, 3, 32, device=device)), "query"),                     # not 4-D
        (dict(key=k.bfloat16()), "key"),                                          # dtype differs from query's
        (dict(key=rand(2, 2, 2, 8, device=device)), "key"),                       # tokens differ from query's
        (dict(value=v.half()), "value"),
        (dict(value=rand(2, 2, 2, 8, device=device)), "value"),                   # tokens differ from key's
        (dict(value=rand(2, 3, 3, 8, device=device)), "value"),                   # kv heads differ from the cache's
        (dict(k_cache=rand(3, 4, 2, 8, device=device), v_cache=rand(3, 4, 2, 8, device=device)),
         "k_cache"),                                                              # cache batch differs
        (dict(k_cache=rand(2, 4, 16, device=device)), "k_cache"),                 # not 4-D
        (dict(k_cache=rand(2, 2, 4, 8, device=device).transpose(1, 2)), "k_cache"),  # not contiguous
        (dict(k_cache=rand(2, 0, 2, 8, device=device), v_cache=rand(2, 0, 2, 8, device=device)), "k_cache"),
        (dict(v_cache=rand(2, 5, 2, 8, device=device)), "v_cache"),               # shape differs from k_cache's
        (dict(v_cache=v_cache.bfloat16()), "v_cache"),
        (dict(positions=positions.int()), "positions"),
        (dict(positions=positions[:1]), "positions"),                             # batch of 1, not 2
        (dict(positions=positions[:, :2].contiguous()), "positions"),
        (dict(positions=positions.flatten()), "positions"),
        (dict(theta=0.0), "theta"),
    ]:
        with pytest.raises(BAD, match=name):
            ops.rotary_embedding_cache_write_(**{**good, **changes})
    for name, t in before.items():  # checked before anything was written
        assert torch.equal(good[name], t), name


@requires_cuda
def test_mixed_devices_name_the_argument():
    x, w = rand(3, 8, device="cuda"), rand(8)
    with pytest.raises(BAD, match="weight"):
        ops.rms_norm(x, w, 1e-6)
    q, k = rand(1, 2, 2, 64, device="cuda"), rand(1, 2, 1, 64, device="cuda")
    with pytest.raises(BAD, match="positions"):
        ops.rotary_embedding_(q, k, torch.arange(2)[None], 10000.0)
    with pytest.raises(BAD, match="key"):
        ops.rotary_embedding_(q, k.cpu(), torch.arange(2, device="cuda")[None], 10000.0)
    caches = rand(1, 4, 1, 64, device="cuda"), rand(1, 4, 1, 64, device="cuda")
    with pytest.raises(BAD, match="value"):
        ops.kv_cache_write_(*caches, k, k.cpu(), torch.arange(2, device="cuda")[None])
    positions = torch.arange(2, device="cuda")[None]
    with pytest.raises(BAD, match="positions"):
        ops.rotary_embedding_cache_write_(q, k, k.clone(), *caches, positions.cpu(), 10000.0)
    with pytest.raises(BAD, match="value"):
        ops.rotary_embedding_cache_write_(q, k, k.cpu(), *caches, positions, 10000.0)
    with pytest.raises(BAD, match="k_cache"):
        ops.rotary_embedding_cache_write_(q, k, k.clone(), caches[0].cpu(), caches[1], positions, 10000.0)
    with pytest.raises(BAD, match="query"):
        ops.rotary_embedding_cache_write_(q.cpu(), k, k.clone(), *caches, positions, 10000.0)


# --------------------------------------------------------------------------------------------
# linear: our kernel up to 16 rows, torch's GEMM beyond (17 rows), same checks either way

# Products of 16-bit values are exact in fp32, so kernel and reference differ by the fp32
# summation order (absolute, with terms up to 4 in magnitude and K up to 577) plus, for 16-bit
# outputs, one rounding step of the result.
LINEAR_TOL = {
    torch.float32: dict(atol=2e-4, rtol=1e-5),
    torch.float16: dict(atol=2e-4, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-4, rtol=1.6e-2),
}
LINEAR_ROWS = [1, 3, 16, 17]
LINEAR_SHAPES = [(577, 1001), (576, 960), (64, 8), (7, 5)]  # in_features K, out_features N


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", LINEAR_ROWS)
@pytest.mark.parametrize("in_features,out_features", LINEAR_SHAPES)
def test_linear(device, dtype, rows, in_features, out_features):
    x = rand(rows, in_features, dtype=dtype, device=device)
    w = rand(out_features, in_features, dtype=dtype, device=device)
    out = ops.linear(x, w)
    assert out.shape == (rows, out_features) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, reference.linear(x, w), **LINEAR_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", LINEAR_ROWS)
def test_linear_strided_rows(device, dtype, rows):
    wide = rand(rows, 577 + 9, dtype=dtype, device=device)
    x = wide[:, 3:3 + 577]  # rows of a wider tensor: row stride 586, misaligned start
    w = rand(1001, 577, dtype=dtype, device=device)
    torch.testing.assert_close(ops.linear(x, w), reference.linear(x, w), **LINEAR_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make_input", [
    lambda t, dev: rand(2, 3, 65, dtype=t, device=dev),                       # 6 rows
    lambda t, dev: rand(1, 1, 65, dtype=t, device=dev),                       # decode at batch 1
    lambda t, dev: rand(65, dtype=t, device=dev),                             # a single vector
    lambda t, dev: rand(3, 5, 65 + 4, dtype=t, device=dev)[..., 2:67],        # 15 evenly strided rows
    lambda t, dev: rand(3, 2, 65, dtype=t, device=dev).transpose(0, 1),       # rows not evenly strided
    lambda t, dev: rand(2, 9, 65, dtype=t, device=dev),                       # 18 rows: torch's GEMM
], ids=["3d", "decode", "1d", "strided-3d", "transposed", "3d-fallback"])
def test_linear_leading_dims(device, dtype, make_input):
    x = make_input(dtype, device)
    w = rand(33, 65, dtype=dtype, device=device)
    out = ops.linear(x, w)
    assert out.shape == (*x.shape[:-1], 33) and out.is_contiguous()
    torch.testing.assert_close(out, reference.linear(x, w), **LINEAR_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_linear_unaligned_weight(device, dtype, rows):
    storage = rand(300 * 576 + 1, dtype=dtype, device=device)
    w = storage[1:].view(300, 576)  # contiguous, but not 16-byte aligned: the CUDA kernel's scalar path
    x = rand(rows, 576, dtype=dtype, device=device)
    torch.testing.assert_close(ops.linear(x, w), reference.linear(x, w), **LINEAR_TOL[dtype])


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_features", [4096, 4100, 3000, 12288, 20000])
def test_linear_cuda_long_rows(dtype, in_features):
    """K beyond what one shared-memory chunk of x holds (64 KB), packed and scalar paths; 12288:
    an x chunk of exactly 48 KB, the default limit less the kernel's static shared memory. One
    row: on CUDA only single rows take our kernel (more go to cuBLAS; ctest covers 2..16)."""
    x = rand(1, in_features, dtype=dtype, device="cuda")
    w = rand(300, in_features, dtype=dtype, device="cuda")
    tol = dict(LINEAR_TOL[dtype], atol=2e-6 * in_features)  # fp32 summation order over a longer K
    torch.testing.assert_close(ops.linear(x, w), reference.linear(x, w), **tol)


@requires_cuda
def test_linear_cuda_shared_memory_sizes_in_any_order():
    """One kernel launched with x chunks of 64 KB, 48 KB, 16 KB and back: the launcher remembers
    how much shared memory it has let the kernel use, and a smaller launch must not lower it."""
    for in_features in [20000, 12288, 4096, 20000, 4096, 12288]:
        x = rand(1, in_features, dtype=torch.bfloat16, device="cuda")
        w = rand(77, in_features, dtype=torch.bfloat16, device="cuda")
        tol = dict(LINEAR_TOL[torch.bfloat16], atol=2e-6 * in_features)
        torch.testing.assert_close(ops.linear(x, w), reference.linear(x, w), **tol)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cuda_overlapping_launches(monkeypatch, dtype):
    """MISTRAL_EXT_PDL=1: each projection may start while the kernel before it runs. Decoder MLP
    blocks back to back, every call reading what the one before wrote: the same values as with
    serial launches (same kernels, same order of sums; a read before the wait would see a stale
    input) and as the reference's composition."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("launches overlap from compute capability 9.0 on")
    monkeypatch.delenv("MISTRAL_EXT_PDL", raising=False)
    hidden, inner, layers = 1024, 2816, 8
    blocks = [(rand(hidden, dtype=dtype, device="cuda"),
               rand(2 * inner, hidden, dtype=dtype, device="cuda") / hidden ** 0.5,
               rand(hidden, inner, dtype=dtype, device="cuda") / inner ** 0.5) for _ in range(layers)]
    h0 = rand(1, hidden, dtype=dtype, device="cuda")
    torch.cuda.synchronize()  # the weights stay fixed while overlapping launches read them

    def chain(linear):
        h = h0
        for norm_weight, gate_up, down in blocks:
            h = linear(linear(h, gate_up, norm_weight=norm_weight, eps=1e-5), down, residual=h, silu_and_mul=True)
        return h

    serial = chain(ops.linear)
    monkeypatch.setenv("MISTRAL_EXT_PDL", "1")
    torch.cuda._sleep(50_000_000)  # holds the stream while the chain is queued: the launches can overlap
    assert torch.equal(chain(ops.linear), serial)
    assert_relative_error(serial, chain(reference.linear), layers * FUSED_REL_ERROR[dtype])


# The decoder's steps fused into the linear op: (prologue, residual) against the reference's
# unfused composition. Each step rounds to the dtype, and one-ulp differences in the prologue's
# output (exp, the sum of squares) move the product by more than an elementwise tolerance on
# outputs near zero allows, so the check is the relative error over the whole output.
FUSED_REL_ERROR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
PROLOGUES = ["none", "rms_norm", "silu_and_mul"]


def fused_linear_inputs(rows, in_features, out_features, prologue, residual, dtype, device):
    """(x, weight, keyword arguments) of a fused linear call on random inputs."""
    width = 2 * in_features if prologue == "silu_and_mul" else in_features
    kwargs = {}
    if prologue == "rms_norm":
        kwargs.update(norm_weight=rand(in_features, dtype=dtype, device=device), eps=1e-5)
    if prologue == "silu_and_mul":
        kwargs.update(silu_and_mul=True)
    if residual:
        kwargs.update(residual=rand(rows, out_features, dtype=dtype, device=device))
    w = rand(out_features, in_features, dtype=dtype, device=device) / in_features ** 0.5
    return rand(rows, width, dtype=dtype, device=device), w, kwargs


def assert_relative_error(out, want, bound):
    assert out.shape == want.shape and out.dtype == want.dtype
    assert torch.isfinite(out).all()
    error = ((out.double() - want.double()).norm() / want.double().norm()).item()
    assert error < bound, f"relative error {error:.2e} >= {bound:.0e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 17])  # 17: torch's GEMM between our prologue and the add
@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("in_features,out_features", [(576, 301), (97, 33), (4100, 40)])
def test_linear_fused(device, dtype, rows, prologue, residual, in_features, out_features):
    x, w, kwargs = fused_linear_inputs(rows, in_features, out_features, prologue, residual, dtype, device)
    out = ops.linear(x, w, **kwargs)
    assert_relative_error(out, reference.linear(x, w, **kwargs), FUSED_REL_ERROR[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 17])
@pytest.mark.parametrize("prologue", PROLOGUES)
def test_linear_fused_equals_the_separate_ops_on_cpu(dtype, rows, prologue):
    """On the CPU the prologue runs through the op's own kernel and the product is the same
    kernel's: fused and unfused agree to the bit."""
    x, w, kwargs = fused_linear_inputs(rows, 576, 301, prologue, True, dtype, "cpu")
    if prologue == "rms_norm":
        x_in = ops.rms_norm(x, kwargs["norm_weight"], kwargs["eps"])
    elif prologue == "silu_and_mul":
        x_in = ops.silu_and_mul(x)
    else:
        x_in = x
    assert torch.equal(ops.linear(x, w, **kwargs), ops.linear(x_in, w) + kwargs["residual"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("make_input", [
    lambda x: x.view(1, *x.shape),                                     # [batch, tokens, K]
    lambda x: torch.cat([x, x[:, :5]], dim=1)[:, :x.shape[1]],         # row stride K + 5
    lambda x: torch.cat([x[:, :1], x], dim=1)[:, 1:],                  # starts one element in: unaligned
], ids=["3d", "strided", "unaligned"])
@pytest.mark.parametrize("rows", [1, 4])
def test_linear_fused_input_layouts(device, dtype, prologue, make_input, rows):
    x, w, kwargs = fused_linear_inputs(rows, 584, 77, prologue, True, dtype, device)
    x = make_input(x)
    kwargs["residual"] = kwargs["residual"].view(*x.shape[:-1], 77)
    out = ops.linear(x, w, **kwargs)
    assert out.shape == (*x.shape[:-1], 77)
    assert_relative_error(out, reference.linear(x, w, **kwargs), FUSED_REL_ERROR[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 17])
def test_linear_fused_opcheck_and_compile(device, rows):
    x, w, kwargs = fused_linear_inputs(rows, 64, 24, "rms_norm", True, torch.float32, device)
    gate_up = rand(rows, 128, device=device)
    op = torch.ops.mistral_ext.linear.default
    torch.library.opcheck(op, (x, w), kwargs)
    torch.library.opcheck(op, (gate_up, w), dict(residual=kwargs["residual"], silu_and_mul=True))

    def block(x, gate_up):
        h = ops.linear(x, w, **kwargs)
        return ops.linear(gate_up, w, residual=h, silu_and_mul=True)

    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, gate_up), block(x, gate_up))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [3, 17])  # both our kernel and torch's GEMM path
def test_linear_fused_bad_input(device, rows):
    x, w = rand(rows, 16, device=device), rand(8, 16, device=device)
    residual, norm_weight = rand(rows, 8, device=device), rand(16, device=device)
    for args, kwargs, name in [
        ((x, w), dict(norm_weight=rand(15, device=device)), "norm_weight must have shape"),
        ((x, w), dict(norm_weight=norm_weight.double()), "norm_weight"),
        ((x, w), dict(norm_weight=rand(16, 1, device=device)), "norm_weight"),
        ((x, w), dict(norm_weight=rand(32, device=device)[::2]), "norm_weight"),  # not contiguous
        ((x, w), dict(norm_weight=norm_weight, eps=-1.0), "eps"),
        ((x, w), dict(silu_and_mul=True), "2 \\* 16"),                  # input must be gate | up
        ((rand(rows, 32, device=device), w), dict(silu_and_mul=True, norm_weight=norm_weight), "one prologue"),
        ((x, w), dict(residual=rand(rows, 9, device=device)), "residual"),
        ((x, w), dict(residual=rand(1, rows, 8, device=device)), "residual"),
        ((x, w), dict(residual=residual.half()), "residual"),
    ]:
        with pytest.raises(BAD, match=name):
            ops.linear(*args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_empty(device):
    x, w = rand(0, 16, device=device), rand(8, 16, device=device)
    assert ops.linear(x, w).shape == (0, 8)
    assert ops.linear(rand(3, 16, device=device), w[:0]).shape == (3, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 16, 17])
def test_linear_opcheck(device, rows):
    x = rand(rows, 33, device=device)
    torch.library.opcheck(torch.ops.mistral_ext.linear.default, (x, rand(20, 33, device=device)))
    torch.library.opcheck(torch.ops.mistral_ext.linear.default, (x.view(1, rows, 33), rand(20, 33, device=device)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_linear_matches_functional(dtype):
    x, w = rand(4, 7, 33, dtype=dtype), rand(12, 33, dtype=dtype)
    want = F.linear(x.double(), w.double()).to(dtype)
    torch.testing.assert_close(reference.linear(x, w), want, **LINEAR_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [3, 17])  # both our kernel and torch's GEMM path
def test_linear_bad_input(device, rows):
    x, w = rand(rows, 16, device=device), rand(8, 16, device=device)
    for args, name in [
        ((x, rand(8, 15, device=device)), "weight"),               # K mismatch
        ((x, w.bfloat16()), "weight"),                             # dtype mismatch
        ((x, rand(8, 16, 1, device=device)), "weight"),            # not 2-D
        ((x, rand(8, device=device)), "weight"),
        ((x, rand(16, 8, device=device).t()), "weight"),           # not contiguous
        ((x.int(), w.int()), "input"),                             # not a float dtype
        ((rand(16, rows, device=device).t(), w), "input"),         # inner stride != 1
        ((torch.tensor(1.0, device=device), w), "input"),          # no dimension
        ((rand(rows, 0, device=device), rand(8, 0, device=device)), "input"),  # K = 0
    ]:
        with pytest.raises(BAD, match=name):
            ops.linear(*args)


@requires_cuda
@pytest.mark.parametrize("rows", [3, 17])
def test_linear_mixed_devices_name_the_argument(rows):
    with pytest.raises(BAD, match="weight"):
        ops.linear(rand(rows, 16, device="cuda"), rand(8, 16))
    with pytest.raises(BAD, match="input"):
        ops.linear(rand(rows, 16), rand(8, 16, device="cuda"))
    x, w = rand(rows, 16, device="cuda"), rand(8, 16, device="cuda")
    with pytest.raises(BAD, match="norm_weight"):
        ops.linear(x, w, norm_weight=rand(16))
    with pytest.raises(BAD, match="residual"):
        ops.linear(x, w, residual=rand(rows, 8))


# --------------------------------------------------------------------------------------------
# decoder_layer: the ops chained in C++, against the reference's chain of its own ops (which the
# model tests check against transformers' decoder layer)

# (batch, tokens, heads, kv_heads, hidden, inter, capacity (0: no cache), cache_lens, window)
LAYER_CASES = [
    (2, 9, 4, 2, 97, 131, 0, None, 5),             # prefill, no cache, a window inside the chunk
    (3, 1, 4, 1, 97, 131, 8, [5, 19, 0], 6),       # decode: RoPE + write first; row 1 has wrapped
    (2, 7, 6, 2, 64, 70, 16, [3, 30], 12),         # a chunk after a cache: written after attention,
                                                   # its first queries see keys its last tokens replace
    (1, 17, 2, 2, 33, 40, 0, None, 0),             # 17 rows: torch's GEMM for the projections on CPU
]


def layer_inputs(case, dtype, device, split_weights):
    batch, tokens, heads, kv_heads, hidden, inter, capacity, cache_lens, window = case
    head_dim = 64
    qkv = rand((heads + 2 * kv_heads) * head_dim, hidden, dtype=dtype, device=device) / hidden ** 0.5
    gate_up = rand(2 * inter, hidden, dtype=dtype, device=device) / hidden ** 0.5
    qkv_weights = list(qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])) \
        if split_weights else [qkv]
    gate_up_weights = list(gate_up.chunk(2)) if split_weights else [gate_up]
    if capacity:
        lens = torch.tensor(cache_lens, dtype=torch.int32, device=device)
        positions = lens.long()[:, None] + torch.arange(tokens, device=device)
        caches = [rand(batch, capacity, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2)]
    else:
        lens, caches = None, [None, None]
        positions = left_padded_positions(batch, tokens, [-3, 0], device)
    args = [rand(batch, tokens, hidden, dtype=dtype, device=device), positions, *caches, lens,
            rand(hidden, dtype=dtype, device=device), [w.contiguous() for w in qkv_weights],
            rand(hidden, heads * head_dim, dtype=dtype, device=device) / (heads * head_dim) ** 0.5,
            rand(hidden, dtype=dtype, device=device), [w.contiguous() for w in gate_up_weights],
            rand(hidden, inter, dtype=dtype, device=device) / inter ** 0.5,
            heads, kv_heads, head_dim, 1e-5, 10000.0, window, head_dim ** -0.5]
    return args


def cloned(args):
    return [[t.clone() for t in a] if isinstance(a, list) else a.clone() if isinstance(a, torch.Tensor) else a
            for a in args]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LAYER_CASES, ids=["prefill", "decode", "chunk_after_cache", "gemm_rows"])
def test_decoder_layer(device, dtype, case):
    args = layer_inputs(case, dtype, device, split_weights=False)
    want_args = cloned(args)
    out = ops.decoder_layer(*args)
    want = reference.decoder_layer(*want_args)
    assert out.shape == want.shape and out.is_contiguous()
    assert_relative_error(out, want, 3 * FUSED_REL_ERROR[dtype])
    if args[2] is not None:  # the caches hold the chunk's rotated keys and its values
        for got, expected in ((args[2], want_args[2]), (args[3], want_args[3])):
            assert_relative_error(got, expected, FUSED_REL_ERROR[dtype])
    assert torch.equal(args[0], want_args[0])  # hidden is not written


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", LAYER_CASES, ids=["prefill", "decode", "chunk_after_cache", "gemm_rows"])
def test_decoder_layer_split_weights_equal_fused(device, case):
    """q, k, v (gate, up) as separate weights, as after a weight is replaced in a fused model:
    each output column is the same dot product as with the one fused weight."""
    fused = layer_inputs(case, torch.float32, device, split_weights=False)
    split = cloned(fused)
    split[6] = list(split[6][0].split([case[2] * 64, case[3] * 64, case[3] * 64]))
    split[9] = list(split[9][0].chunk(2))
    torch.testing.assert_close(ops.decoder_layer(*split), ops.decoder_layer(*fused), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [LAYER_CASES[0], LAYER_CASES[1]], ids=["no_cache", "cache"])
def test_decoder_layer_without_tokens(device, case):
    args = layer_inputs((case[0], 0, *case[2:]), torch.float32, device, split_weights=False)
    caches = [None if c is None else c.clone() for c in args[2:4]]
    out = ops.decoder_layer(*args)
    assert out.shape == args[0].shape
    for cache, before in zip(args[2:4], caches):
        assert cache is None or torch.equal(cache, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", LAYER_CASES, ids=["prefill", "decode", "chunk_after_cache", "gemm_rows"])
def test_decoder_layer_opcheck_and_compile(device, case):
    args = layer_inputs(case, torch.float32, device, split_weights=True)
    if args[2] is None:  # the op's own form of "no cache"
        args[2:4] = [args[0].new_empty(case[0], 0, case[3], 64) for _ in range(2)]
    torch.library.opcheck(torch.ops.mistral_ext.decoder_layer.default, tuple(args))
    compiled_args = cloned(args)
    compiled = torch.compile(ops.decoder_layer, fullgraph=True)(*compiled_args)
    torch.testing.assert_close(compiled, ops.decoder_layer(*args))
    for got, want in zip(compiled_args[2:4], args[2:4]):  # the caches written in place
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_decoder_layer_bad_input(device):
    args = layer_inputs(LAYER_CASES[1], torch.float32, device, split_weights=True)
    qkv_weights, gate_up_weights = args[6], args[9]

    def with_(index, value):
        return [value if i == index else a for i, a in enumerate(args)]

    for bad, name in [
        (with_(0, args[0][0]), "hidden must have 3 dimensions"),
        (with_(0, args[0].double()), "hidden must be float32"),
        (with_(5, args[5][:-1]), "input_norm_weight must have shape"),
        (with_(8, args[8].half()), "post_attention_norm_weight has dtype"),
        (with_(6, []), "qkv_weights must hold at least one weight"),
        (with_(6, qkv_weights[:2]), "qkv_weights have 320 rows in all, but .* = 384"),
        (with_(6, [qkv_weights[0], qkv_weights[1][:, :-1].contiguous(), qkv_weights[2]]),
         r"qkv_weights\[1\] must have shape \[rows, 97\]"),
        (with_(6, [qkv_weights[0], qkv_weights[1].bfloat16(), qkv_weights[2]]), r"qkv_weights\[1\] has dtype"),
        (with_(7, args[7].t()), "o_weight must have shape"),
        (with_(7, args[7][:, :255]), "o_weight must have shape"),
        (with_(9, [gate_up_weights[0], gate_up_weights[1][:-1]]), "gate and up must have the same number"),
        (with_(10, args[10][:, :-1].contiguous()), "down_weight must have shape"),
        (with_(10, torch.cat([args[10], args[10]], 1)[:, :131]), "down_weight must be contiguous"),
        (with_(11, 3), "qkv_weights have"),
        (with_(12, 3), "qkv_weights have"),
        (with_(13, 0), "head_dim must be > 0"),
        (with_(3, None), "k_cache and v_cache must both be given"),
        (with_(1, args[1].int()), "positions must be int64"),
        (with_(4, args[4][:2]), "cache_lens must have shape"),
        (with_(4, args[4].long()), "cache_lens must be int32"),
        (with_(4, None), "cache_lens is required"),
        (layer_inputs((1, 1, 4, 3, 97, 131, 8, [5], 6), torch.float32, device, False),
         r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
    ]:
        caches = [args[2].clone(), args[3].clone()]
        with pytest.raises(BAD, match=name):
            ops.decoder_layer(*bad)
        assert torch.equal(args[2], caches[0]) and torch.equal(args[3], caches[1])  # checked before written
