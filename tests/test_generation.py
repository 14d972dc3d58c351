"""generate() against transformers' generate() on the same random weights (fp32, CPU).

transformers' weights are re-drawn so that logits are O(1) apart (with its default init the
distributions are nearly flat and greedy picks would hinge on rounding), then loaded into ours.
Greedy decoding must give transformers' tokens: past the sliding window, with eos stopping,
left-padded batches, repetition penalty and min_new_tokens. Sampling is checked for
reproducibility and for its filters (transformers' own warpers on random scores).
"""

import pytest
import torch
import transformers
from transformers.generation import logits_process

from mistral_ext import MistralConfig, MistralForCausalLM, MistralTokenizer
from mistral_ext import generation
from mistral_ext.generation import TextStreamer
from random_weights import randomize_

VOCAB = 101
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=1000.0, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)


@torch.no_grad()
def make_pair(seed=0, **overrides):
    """transformers' MistralForCausalLM with fan-in scaled random weights, and ours holding them."""
    kwargs = {**BASE, **overrides}
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**kwargs, attn_implementation="eager")).eval()
    randomize_(hf, seed, scale=2.0)
    ours = MistralForCausalLM(MistralConfig(**kwargs))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours.eval(), hf


def prompt(batch, length, seed, vocab=VOCAB):
    """Random prompt ids avoiding the special ids 0..2."""
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def hf_generate(hf, ids, mask=None, **kwargs):
    mask = torch.ones_like(ids) if mask is None else mask
    return hf.generate(ids, attention_mask=mask, do_sample=False, **kwargs)


def eos_candidate(hf, ids, new_tokens, step):
    """(token, index): a token that greedy decoding of row 0 first emits at index >= step (to use
    as eos)."""
    generated = hf_generate(hf, ids, max_new_tokens=new_tokens, eos_token_id=None)[0, ids.shape[1]:].tolist()
    for candidate in generated[step:]:
        if candidate not in generated[:step] and candidate > 2:
            return candidate, generated.index(candidate)
    pytest.skip("no usable eos candidate in this random draw")


# ------------------------------------------------------------------------------------------------
# Greedy against transformers
@pytest.mark.parametrize("window, prompt_len, new_tokens", [(None, 9, 17), (6, 11, 25), (64, 5, 12)])
def test_greedy_matches_transformers(window, prompt_len, new_tokens):
    ours, hf = make_pair(seed=prompt_len, sliding_window=window)
    ids = prompt(2, prompt_len, seed=window or 0)
    expected = hf_generate(hf, ids, max_new_tokens=new_tokens, eos_token_id=None)
    got = ours.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, eos_token_id=[])
    assert got.dtype == torch.long
    assert torch.equal(got, expected)


def test_prompt_longer_than_max_position_embeddings_runs_on_the_window():
    ours, hf = make_pair(seed=2, sliding_window=8, max_position_embeddings=16)
    ids = prompt(2, 21, seed=2)
    expected = hf_generate(hf, ids, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(ours.generate(ids, max_new_tokens=10, eos_token_id=[]), expected)


def test_eos_stops_like_transformers():
    ours, hf = make_pair(seed=3, sliding_window=5)
    ids = prompt(1, 7, seed=3)
    eos, _ = eos_candidate(hf, ids, new_tokens=20, step=6)
    expected = hf_generate(hf, ids, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    got = ours.generate(ids, max_new_tokens=20, eos_token_id=[eos, 2], pad_token_id=0)
    assert torch.equal(got, expected)
    assert got[0, -1] == eos and got.shape[1] < ids.shape[1] + 20


def test_left_padded_batch_rows_match_alone_and_transformers():
    ours, hf = make_pair(seed=4, sliding_window=6)
    rows = [prompt(1, n, seed=n)[0].tolist() for n in (3, 12, 8)]
    ids, mask = left_pad(rows)
    batch = ours.generate(ids, attention_mask=mask, max_new_tokens=15, eos_token_id=[])
    assert torch.equal(batch, hf_generate(hf, ids, mask, max_new_tokens=15, eos_token_id=None))
    for i, row in enumerate(rows):
        alone = ours.generate(torch.tensor([row]), max_new_tokens=15, eos_token_id=[])
        assert batch[i, ids.shape[1]:].tolist() == alone[0, len(row):].tolist()


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_prompt_in_chunks_matches_transformers(chunk):
    """Chunks shorter and longer than the window (6), one row's first chunks all padding."""
    ours, hf = make_pair(seed=5, sliding_window=6)
    rows = [prompt(1, n, seed=n)[0].tolist() for n in (2, 17, 9)]
    ids, mask = left_pad(rows)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], prefill_chunk_size=chunk)
    assert torch.equal(got, hf_generate(hf, ids, mask, max_new_tokens=12, eos_token_id=None))


def test_finished_rows_are_padded_and_generation_stops():
    ours, hf = make_pair(seed=5, sliding_window=None)
    ids = prompt(3, 6, seed=5)
    eos, _ = eos_candidate(hf, ids, new_tokens=12, step=2)
    got = ours.generate(ids, max_new_tokens=30, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(got, hf_generate(hf, ids, max_new_tokens=30, eos_token_id=eos, pad_token_id=1))
    generated = got[:, 6:]
    finished_at = [row.index(eos) if eos in row else None for row in generated.tolist()]
    assert finished_at[0] is not None
    for row, end in zip(generated.tolist(), finished_at):
        if end is not None:
            assert all(t == 1 for t in row[end + 1:])
    # Stops as soon as every row has finished, or after max_new_tokens.
    assert got.shape[1] == 6 + (30 if None in finished_at else max(finished_at) + 1)


def test_default_length_is_20_new_tokens_and_max_length_counts_the_prompt():
    ours, hf = make_pair(seed=6)
    ids = prompt(1, 4, seed=6)
    assert torch.equal(ours.generate(ids, eos_token_id=[]), hf_generate(hf, ids, eos_token_id=None))
    assert torch.equal(ours.generate(ids, max_length=11, eos_token_id=[]),
                       hf_generate(hf, ids, max_length=11, eos_token_id=None))


def test_repetition_penalty_and_min_new_tokens_match_transformers():
    ours, hf = make_pair(seed=7, sliding_window=7)
    rows = [prompt(1, n, seed=10 + n)[0].tolist() for n in (5, 9)]
    ids, mask = left_pad(rows)
    eos, first = eos_candidate(hf, ids[1:], new_tokens=16, step=2)
    # min_new_tokens == first lets eos through exactly where greedy emits it; first + 1 holds it back.
    for penalty, min_new in ((1.0, first), (1.0, first + 1), (1.7, 0), (0.6, 4)):
        kwargs = dict(max_new_tokens=16, repetition_penalty=penalty, min_new_tokens=min_new,
                      eos_token_id=eos, pad_token_id=0)
        expected = hf_generate(hf, ids, mask, **kwargs)
        assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), expected), (penalty, min_new)


def test_num_return_sequences_expands_rows():
    ours, _ = make_pair(seed=8)
    ids = prompt(2, 5, seed=8)
    out = ours.generate(ids, do_sample=True, num_return_sequences=3, max_new_tokens=6, seed=1, eos_token_id=[])
    assert out.shape == (6, 11)
    assert torch.equal(out[:, :5], ids.repeat_interleave(3, dim=0))


# ------------------------------------------------------------------------------------------------
# Sampling
def test_sampling_is_reproducible_with_a_seed_and_varies_across_seeds():
    ours, _ = make_pair(seed=9)
    ids = prompt(2, 6, seed=9)

    def sample(**kwargs):
        return ours.generate(ids, do_sample=True, max_new_tokens=24, eos_token_id=[], temperature=1.5, **kwargs)

    assert torch.equal(sample(seed=1), sample(seed=1))
    assert torch.equal(sample(generator=torch.Generator().manual_seed(5)),
                       sample(generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(sample(seed=1), sample(seed=2))


def test_top_k_1_sampling_equals_greedy():
    ours, _ = make_pair(seed=10, sliding_window=5)
    ids = prompt(2, 8, seed=10)
    greedy = ours.generate(ids, max_new_tokens=20, eos_token_id=[])
    sampled = ours.generate(ids, max_new_tokens=20, eos_token_id=[], do_sample=True, top_k=1, seed=3,
                            temperature=0.7)
    assert torch.equal(sampled, greedy)


def test_filters_match_transformers_warpers():
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(4, 57, generator=g) * 3
    ids = torch.randint(0, 57, (4, 9), generator=g)
    for k in (1, 5, 57, 80):
        assert torch.equal(generation._apply_top_k(scores, k), logits_process.TopKLogitsWarper(k)(ids, scores))
    for p in (0.0, 0.3, 0.9, 1.0):
        assert torch.equal(generation._apply_top_p(scores, p), logits_process.TopPLogitsWarper(p)(ids, scores))
    for penalty in (0.5, 1.3):
        seen = torch.zeros(4, 57, dtype=torch.bool).scatter_(1, ids, True)
        expected = logits_process.RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone())
        assert torch.equal(generation._apply_repetition_penalty(scores, seen, penalty), expected)


# ------------------------------------------------------------------------------------------------
# Memory and streaming
def test_generation_past_the_window_keeps_cache_memory_flat():
    ours, hf = make_pair(seed=12, sliding_window=8)
    sizes = []
    ours.register_forward_hook(lambda module, args, kwargs, out: sizes.append(out.past_key_values.nbytes),
                               with_kwargs=True)
    ids = prompt(1, 5, seed=12)
    out = ours.generate(ids, max_new_tokens=60, eos_token_id=[])
    assert torch.equal(out, hf_generate(hf, ids, max_new_tokens=60, eos_token_id=None))
    config = ours.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    assert len(sizes) == 60 and set(sizes) == {8 * per_token}


@pytest.fixture(scope="module")
def mistral_tokenizer():
    mistral_common = pytest.importorskip("mistral_common")
    return MistralTokenizer.from_pretrained(f"{mistral_common.__path__[0]}/data/tokenizer.model.v1")


def test_streamer_receives_exactly_the_decoded_text(mistral_tokenizer):
    tok = mistral_tokenizer
    ours, _ = make_pair(seed=13, vocab_size=tok.vocab_size, sliding_window=6)
    ids = torch.tensor([tok.encode("Streaming: héllo wörld 🙂 世界")])
    pieces = []
    out = ours.generate(ids, max_new_tokens=40, do_sample=True, seed=4, eos_token_id=[],
                        streamer=pieces.append, tokenizer=tok)
    assert "".join(pieces) == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.tolist())

        def end(self):
            self.calls.append("end")

    recorder = Recorder()
    out = ours.generate(ids, max_new_tokens=5, eos_token_id=[], streamer=recorder)
    assert recorder.calls == [ids.tolist()] + [[t] for t in out[0, ids.shape[1]:].tolist()] + ["end"]


@pytest.mark.parametrize("text", ["plain words and spaces", "bytes: 🙂🚀 世界 ﷽ \x07 tab\tend",
                                  "lines\n\n  indented\n", " leading space"])
def test_text_streamer_emits_complete_utf8_only(mistral_tokenizer, text):
    tok = mistral_tokenizer
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    pieces = []
    streamer = TextStreamer(tok, skip_prompt=True, callback=pieces.append, skip_special_tokens=True)
    streamer.put(torch.tensor([[tok.bos_token_id]]))   # the prompt, skipped
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in piece for piece in pieces)


def test_text_streamer_rejects_batches(mistral_tokenizer):
    streamer = TextStreamer(mistral_tokenizer, skip_prompt=False, callback=lambda text: None)
    with pytest.raises(ValueError, match="batch size 1"):
        streamer.put(torch.tensor([[5], [6]]))


# ------------------------------------------------------------------------------------------------
# Bad input
@pytest.fixture(scope="module")
def small_model():
    return make_pair(seed=14, sliding_window=4)[0]


def test_max_new_tokens_zero_returns_the_prompt(small_model):
    ids = prompt(2, 5, seed=14)
    assert torch.equal(small_model.generate(ids, max_new_tokens=0), ids)


def test_no_input_ids_starts_from_bos(small_model):
    out = small_model.generate(max_new_tokens=3, eos_token_id=[])
    assert out.shape == (1, 4) and out[0, 0] == BASE["bos_token_id"]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "non-empty prompt"),
    (dict(input_ids=torch.ones(2, 3)), ValueError, "integer tensor"),
    (dict(input_ids=torch.tensor([4, 5, 6])), ValueError, "shape"),
    (dict(attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])), ValueError, "empty"),
    (dict(attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]])), ValueError, "left padding"),
    (dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), ValueError, "must match"),
    (dict(input_ids=torch.tensor([[4, VOCAB, 5]])), ValueError, "vocab"),
    (dict(max_length=3, max_new_tokens=None), ValueError, "max_length"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(prefill_chunk_size=0), ValueError, "prefill_chunk_size"),
    (dict(do_sample=True, temperature=0.0), ValueError, "temperature"),
    (dict(do_sample=True, top_p=1.5), ValueError, "top_p"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(eos_token_id=VOCAB + 3), ValueError, "eos_token_id"),
    (dict(eos_token_id="2"), ValueError, "eos_token_id"),
    (dict(num_return_sequences=2), ValueError, "do_sample"),
    (dict(streamer=print), ValueError, "tokenizer"),
    (dict(streamer=42), TypeError, "streamer"),
    (dict(num_beams=4), NotImplementedError, "num_beams"),
    (dict(return_dict_in_generate=True), NotImplementedError, "return_dict_in_generate"),
    (dict(not_an_argument=1), ValueError, "not_an_argument"),
    (dict(use_cuda_graph=True), ValueError, "CUDA"),
])
def test_bad_arguments_raise_clear_errors(small_model, kwargs, error, match):
    kwargs = {"input_ids": torch.tensor([[4, 5, 6], [7, 8, 9]]), "max_new_tokens": 3, **kwargs}
    with pytest.raises(error, match=match):
        small_model.generate(**kwargs)


def test_out_of_memory_names_the_request_and_leaves_the_model_usable(small_model, monkeypatch):
    ids = prompt(2, 4, seed=15)
    expected = small_model.generate(ids, max_new_tokens=6)
    forward, calls = small_model.forward, []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(small_model, "forward", failing_forward)
    with pytest.raises(torch.OutOfMemoryError, match=r"2 rows of 4 prompt \+ 6 new tokens.*Tried to allocate"):
        small_model.generate(ids, max_new_tokens=6)
    monkeypatch.undo()
    assert torch.equal(small_model.generate(ids, max_new_tokens=6), expected)


def test_cuda_graph_refuses_the_reference_backend():
    ours, _ = make_pair(seed=6)
    with pytest.raises(ValueError, match="kernels"):
        ours.set_kernel_backend("reference").generate(prompt(1, 4, seed=6), max_new_tokens=3, use_cuda_graph=True)


def test_harmless_transformers_arguments_are_accepted(small_model):
    ids = prompt(1, 4, seed=15)
    plain = small_model.generate(ids, max_new_tokens=4)
    same = small_model.generate(ids, max_new_tokens=4, use_cache=False, num_beams=1, synced_gpus=False,
                                token_type_ids=torch.zeros_like(ids), output_scores=False)
    assert torch.equal(plain, same)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_greedy_with_deferred_stop_check_matches_cpu():
    # head_dim 64: the CUDA attention kernel's smallest
    ours, hf = make_pair(seed=16, sliding_window=6, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    ids = prompt(3, 9, seed=16)
    eos, _ = eos_candidate(hf, ids, new_tokens=30, step=3)
    expected = ours.generate(ids, max_new_tokens=30, eos_token_id=eos)
    got = ours.cuda().generate(ids.cuda(), max_new_tokens=30, eos_token_id=eos)
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), expected)


CUDA_SHAPES = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1)  # head_dim 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_generate_equals_eager_generate():
    """Left-padded batch past the window, greedy with eos and sampling: the graph replays the same step
    (fp32: cuBLAS rounding differences inside a capture are far below the gaps between logits)."""
    ours, hf = make_pair(seed=17, sliding_window=7, **CUDA_SHAPES)
    ours = ours.cuda()
    ids, mask = left_pad([[5, 9, 14, 3, 22, 7, 40, 11, 6], [8, 30, 4], [12, 50, 60, 70, 80]])
    eos, _ = eos_candidate(hf, ids[:1], new_tokens=25, step=5)
    for kwargs in (dict(eos_token_id=eos), dict(do_sample=True, top_k=0, eos_token_id=[])):
        eager = ours.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=25, seed=3, **kwargs)
        graph = ours.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=25, seed=3,
                              use_cuda_graph=True, **kwargs)
        assert torch.equal(graph, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_split_kv_decode_equals_eager():
    """bf16 (the decode attention kernel) over a 330-slot cache and no window: the keys are split
    across CTAs, whose workspace is allocated inside the capture, and merged by the combine kernel.
    Batch 1: every decode matmul is our GEMV, whose sums do not depend on the capture."""
    ours, _ = make_pair(seed=22, sliding_window=None, **CUDA_SHAPES)
    ours = ours.to(device="cuda", dtype=torch.bfloat16)
    ids = prompt(1, 300, seed=22).cuda()
    eager = ours.generate(ids, max_new_tokens=30)
    assert torch.equal(ours.generate(ids, max_new_tokens=30, use_cuda_graph=True), eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_failure_is_reported_and_leaves_the_process_usable(monkeypatch):
    ours, _ = make_pair(seed=21, sliding_window=7, **CUDA_SHAPES)
    ours = ours.cuda()
    ids = prompt(1, 5, seed=21).cuda()
    expected = ours.generate(ids, max_new_tokens=6)
    forward = generation._DecodeStep._forward

    def syncing_forward(self, tokens, positions):
        if torch.cuda.is_current_stream_capturing():
            tokens.cpu()  # a host sync, which a capture does not allow
        return forward(self, tokens, positions)

    monkeypatch.setattr(generation._DecodeStep, "_forward", syncing_forward)
    stream = torch.cuda.current_stream()
    with pytest.raises(RuntimeError, match="capturing the decode step failed"):
        ours.generate(ids, max_new_tokens=6, use_cuda_graph=True)
    assert torch.cuda.current_stream() == stream
    monkeypatch.undo()
    assert torch.equal(ours.generate(ids, max_new_tokens=6, use_cuda_graph=True), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the decode attention kernel
def test_cuda_overlapping_launches_equal_serial_generate(monkeypatch, dtype):
    """Batch 1 (our GEMV for every projection) with MISTRAL_EXT_PDL=1: the decode step's kernels may
    start while the kernel before each runs, eagerly and inside the captured graph; the tokens are
    those of serial launches (the same kernels and sums)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("launches overlap from compute capability 9.0 on")
    monkeypatch.delenv("MISTRAL_EXT_PDL", raising=False)
    ours, _ = make_pair(seed=20, sliding_window=7, **CUDA_SHAPES)
    ours = ours.to(device="cuda", dtype=dtype)
    ids = prompt(1, 9, seed=20).cuda()
    serial = ours.generate(ids, max_new_tokens=25)
    monkeypatch.setenv("MISTRAL_EXT_PDL", "1")
    for use_cuda_graph in (False, True):
        assert torch.equal(ours.generate(ids, max_new_tokens=25, use_cuda_graph=use_cuda_graph), serial)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_step_matches_eager_step(dtype):
    """Step by step: the same logits, cache contents, cache lengths and token count."""
    ours, _ = make_pair(seed=18, sliding_window=6, **CUDA_SHAPES)
    ours = ours.to(device="cuda", dtype=dtype)
    ids = prompt(3, 5, seed=18).cuda()
    caches = []
    for _ in range(2):
        caches.append(ours(ids, past_key_values=generation.RollingCache(ours.config, max_length=20)).past_key_values)
    eager, graph = (generation._DecodeStep(ours, cache, use_cuda_graph) for cache, use_cuda_graph in
                    zip(caches, (False, True)))
    # cuBLAS (3 rows) may pick another algorithm inside a capture: equal up to rounding.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    tokens = prompt(3, 15, seed=19).cuda()
    for step in range(15):
        positions = torch.full((3, 1), 5 + step, device="cuda")
        expected = eager(tokens[:, step:step + 1], positions).clone()
        torch.testing.assert_close(graph(tokens[:, step:step + 1], positions), expected, **tol)
    assert graph.graph is not None  # replayed, not run eagerly
    assert caches[1].seen_tokens == caches[0].seen_tokens == 20
    assert torch.equal(caches[1].cache_lens, caches[0].cache_lens)
    for a, b in zip(caches[0].key_cache + caches[0].value_cache, caches[1].key_cache + caches[1].value_cache):
        torch.testing.assert_close(b, a, **tol)
