"""The model classes against transformers' Mistral (the peer; a test dependency only).

Random small configs in fp32 on CPU: grouped, multi-query and multi-head attention, head_dim
different from hidden/heads, windows much smaller than the sequence, no window. transformers'
weights (re-drawn so that activations are O(1) and a wrong mask or rotation shows) are loaded
strictly into ours, and ours must give transformers' full-sequence logits however the sequence
is fed: whole, token by token past the window, in chunks longer than the window, left-padded in
a batch. The model runs on the kernels; MISTRAL_EXT_TEST_BACKEND=reference runs it on
mistral_ext.reference instead (for debugging a kernel).
"""
import json
import os

import pytest
import torch
import transformers

from mistral_ext import (AutoConfig, AutoModel, AutoModelForCausalLM, MistralConfig, MistralForCausalLM,
                         MistralForSequenceClassification, MistralModel, RollingCache)
from mistral_ext import modeling
from random_weights import randomize_

BACKEND = os.environ.get("MISTRAL_EXT_TEST_BACKEND", "kernels")
ATOL = RTOL = 1e-4

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=1000.0, rms_norm_eps=1e-5)
CONFIGS = {
    "gqa_window5": dict(sliding_window=5),
    "mqa_window7": dict(num_key_value_heads=1, sliding_window=7),
    "mha_no_window": dict(num_key_value_heads=4, sliding_window=None),
    "head_dim_24_window6": dict(hidden_size=48, head_dim=24, sliding_window=6),
    "window_longer_than_sequence": dict(sliding_window=64, num_hidden_layers=3),
}


def config_kwargs(name="gqa_window5", **overrides):
    return {**BASE, **CONFIGS[name], **overrides}


def make_pair(kwargs, ours_cls=MistralForCausalLM, hf_cls=transformers.MistralForCausalLM, seed=0,
              attn_implementation="eager"):
    """transformers' model with random weights and ours holding the same weights."""
    hf = hf_cls(transformers.MistralConfig(**kwargs, attn_implementation=attn_implementation)).eval()
    randomize_(hf, seed)
    ours = ours_cls(MistralConfig(**kwargs))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours.set_kernel_backend(BACKEND).eval(), hf


def random_ids(shape, vocab, seed):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(hf, ids, **kwargs):
    return hf(input_ids=ids, use_cache=False, **kwargs).logits


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------
# Full sequence against transformers
@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_sequence_logits_loss_and_hidden_states(name):
    kwargs = config_kwargs(name)
    ours, hf = make_pair(kwargs, seed=len(name))
    ids = random_ids((2, 23), kwargs["vocab_size"], seed=1)
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        expected = hf(input_ids=ids, labels=labels, use_cache=False, output_hidden_states=True)
    out = ours(input_ids=ids, labels=labels, use_cache=False, output_hidden_states=True)
    assert_close(out.logits, expected.logits)
    assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
    assert len(out.hidden_states) == len(expected.hidden_states) == kwargs["num_hidden_layers"] + 1
    for got, want in zip(out.hidden_states, expected.hidden_states):
        assert_close(got, want)
    assert out.past_key_values is None


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_both_backends_match_both_transformers_attentions(backend, attn_implementation):
    kwargs = config_kwargs("gqa_window5")
    ours, hf = make_pair(kwargs, seed=3, attn_implementation=attn_implementation)
    ours.set_kernel_backend(backend)
    ids = random_ids((3, 19), kwargs["vocab_size"], seed=4)
    assert_close(ours(ids).logits, hf_logits(hf, ids))


def test_inputs_embeds_logits_to_keep_and_tuple_output():
    kwargs = config_kwargs("mqa_window7")
    ours, hf = make_pair(kwargs, seed=5)
    ids = random_ids((2, 15), kwargs["vocab_size"], seed=6)
    expected = hf_logits(hf, ids)
    embeds = ours.model.embed_tokens.weight[ids].detach()
    assert_close(ours(inputs_embeds=embeds).logits, expected)
    assert_close(ours(ids, logits_to_keep=3).logits, expected[:, -3:])
    logits, cache = ours(ids, return_dict=False)
    assert isinstance(cache, RollingCache)
    assert_close(logits, expected)
    hidden = MistralModel(MistralConfig(**kwargs))
    hidden.load_state_dict(ours.model.state_dict())
    assert_close(hidden.set_kernel_backend(BACKEND)(ids).last_hidden_state,
                 hf.model(ids, use_cache=False).last_hidden_state)


def test_tied_embeddings_match_transformers():
    kwargs = config_kwargs("gqa_window5", tie_word_embeddings=True)
    ours, hf = make_pair(kwargs, seed=7)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = random_ids((1, 17), kwargs["vocab_size"], seed=8)
    assert_close(ours(ids).logits, hf_logits(hf, ids))


# ------------------------------------------------------------------------------------------------
# The rolling cache
@pytest.mark.parametrize("name", ["gqa_window5", "mqa_window7", "mha_no_window", "head_dim_24_window6"])
def test_token_by_token_decoding_past_three_windows(name):
    kwargs = config_kwargs(name)
    window = kwargs["sliding_window"] or 6
    ours, hf = make_pair(kwargs, seed=9)
    ids = random_ids((2, 3 * window + 2), kwargs["vocab_size"], seed=10)
    expected = hf_logits(hf, ids)
    cache = None
    for t in range(ids.shape[1]):
        out = ours(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        assert_close(out.logits[:, 0], expected[:, t])
    assert cache.get_seq_length() == ids.shape[1]
    assert cache.cache_lens.tolist() == [ids.shape[1]] * 2


@pytest.mark.parametrize("name,chunks", [("gqa_window5", [12, 1, 7, 3, 11]),
                                         ("head_dim_24_window6", [2, 15, 1, 13]),
                                         ("mha_no_window", [9, 1, 17, 4])])
def test_chunked_prefill_with_chunks_longer_than_the_window(name, chunks):
    kwargs = config_kwargs(name)
    ours, hf = make_pair(kwargs, seed=11)
    ids = random_ids((2, sum(chunks)), kwargs["vocab_size"], seed=12)
    expected = hf_logits(hf, ids)
    cache, start = RollingCache(ours.config), 0
    for size in chunks:
        out = ours(ids[:, start:start + size], past_key_values=cache)
        assert out.past_key_values is cache
        assert_close(out.logits, expected[:, start:start + size])
        start += size


def test_left_padded_batch_rows_equal_each_sequence_alone():
    kwargs = config_kwargs("gqa_window5")
    ours, hf = make_pair(kwargs, seed=13)
    lengths, width, new_tokens = [14, 6, 11], 14, 9
    ids = random_ids((3, width), kwargs["vocab_size"], seed=14)
    later = random_ids((3, new_tokens), kwargs["vocab_size"], seed=15)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length:] = 1
        ids[row, :width - length] = 0
    # Prefill in chunks shorter than the padding (row 1's first chunks are all padding), then decode.
    cache, logits = RollingCache(ours.config), []
    for start in range(0, width, 4):
        out = ours(ids[:, start:start + 4], attention_mask=mask[:, :start + 4], past_key_values=cache)
        logits.append(out.logits)
    for t in range(new_tokens):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        logits.append(ours(later[:, t:t + 1], attention_mask=mask, past_key_values=cache).logits)
    logits = torch.cat(logits, dim=1)
    for row, length in enumerate(lengths):
        alone = torch.cat([ids[row:row + 1, width - length:], later[row:row + 1]], dim=1)
        assert_close(logits[row:row + 1, width - length:], hf_logits(hf, alone))
    assert cache.cache_lens.tolist() == [length + new_tokens for length in lengths]


def test_position_ids_given_match_derived():
    kwargs = config_kwargs("mqa_window7")
    ours, hf = make_pair(kwargs, seed=16)
    ids = random_ids((2, 12), kwargs["vocab_size"], seed=17)
    expected = hf_logits(hf, ids)
    first = ours(ids[:, :8], position_ids=torch.arange(8)[None])
    second = ours(ids[:, 8:], position_ids=torch.arange(8, 12).expand(2, 4), past_key_values=first.past_key_values)
    assert_close(torch.cat([first.logits, second.logits], dim=1), expected)


def test_cache_memory_is_flat_past_the_window():
    kwargs = config_kwargs("gqa_window5")
    window = kwargs["sliding_window"]
    ours, _ = make_pair(kwargs, seed=18)
    ids = random_ids((2, 5 * window), kwargs["vocab_size"], seed=19)
    cache = RollingCache(ours.config)
    ours(ids[:, :3], past_key_values=cache)
    assert cache.capacity == 3  # sized for what is needed, grows up to the window
    for t in range(3, 2 * window):
        ours(ids[:, t:t + 1], past_key_values=cache)
    after_two_windows = cache.nbytes
    for t in range(2 * window, 5 * window):
        ours(ids[:, t:t + 1], past_key_values=cache)
    assert cache.nbytes == after_two_windows
    assert cache.capacity == window
    assert after_two_windows == 2 * 2 * kwargs["num_hidden_layers"] * window * kwargs["num_key_value_heads"] \
        * (kwargs["hidden_size"] // kwargs["num_attention_heads"]) * 4


def test_cache_without_window_grows_and_respects_max_length():
    kwargs = config_kwargs("mha_no_window")
    ours, _ = make_pair(kwargs, seed=20)
    ids = random_ids((1, 40), kwargs["vocab_size"], seed=21)
    cache = RollingCache(ours.config)
    ours(ids[:, :30], past_key_values=cache)
    ours(ids[:, 30:], past_key_values=cache)
    assert cache.capacity >= 40
    reserved = RollingCache(ours.config, max_length=40)
    ours(ids[:, :5], past_key_values=reserved)
    assert reserved.capacity == 40


# ------------------------------------------------------------------------------------------------
# Sequence classification
@pytest.mark.parametrize("num_labels,problem", [(3, "single_label_classification"), (1, "regression"),
                                                (4, "multi_label_classification")])
def test_sequence_classification_matches_transformers(num_labels, problem):
    kwargs = config_kwargs("gqa_window5", num_labels=num_labels, pad_token_id=0)
    ours, hf = make_pair(kwargs, MistralForSequenceClassification, transformers.MistralForSequenceClassification,
                         seed=22 + num_labels)
    ids = random_ids((3, 13), kwargs["vocab_size"], seed=23).clamp(min=1)
    ids[1, :5] = 0  # left padding
    mask = (ids != 0).long()
    g = torch.Generator().manual_seed(24)
    labels = {"single_label_classification": torch.randint(0, num_labels, (3,), generator=g),
              "regression": torch.randn(3, generator=g),
              "multi_label_classification": torch.randint(0, 2, (3, num_labels), generator=g).float()}[problem]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels, use_cache=False)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.logits, expected.logits)
    assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
    # Right padding without a mask: the last non-pad token pools, as in transformers.
    right = torch.cat([ids[:, 5:], torch.zeros(3, 5, dtype=torch.long)], dim=1)
    assert_close(ours(right).logits, hf(input_ids=right, use_cache=False).logits)


def test_sequence_classification_without_pad_token_needs_batch_one():
    kwargs = config_kwargs("gqa_window5")
    ours, _ = make_pair(kwargs, MistralForSequenceClassification, transformers.MistralForSequenceClassification)
    ids = random_ids((2, 5), kwargs["vocab_size"], seed=25)
    assert ours(ids[:1]).logits.shape == (1, 2)
    with pytest.raises(ValueError, match="padding token"):
        ours(ids)


# ------------------------------------------------------------------------------------------------
# Construction, init, fusion, aliases
def test_init_like_transformers_and_meta_construction():
    kwargs = config_kwargs("gqa_window5", pad_token_id=3, vocab_size=400, hidden_size=128, initializer_range=0.05)
    torch.manual_seed(26)
    model = MistralForCausalLM(MistralConfig(**kwargs))
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() - 0.05) < 0.01 and abs(p.mean().item()) < 0.01, name
    assert not model.model.embed_tokens.weight[3].any()
    hf_names = transformers.MistralForCausalLM(transformers.MistralConfig(**kwargs)).state_dict().keys()
    assert list(model.state_dict().keys()) == list(hf_names)

    with torch.device("meta"):
        meta = MistralForCausalLM(MistralConfig(**kwargs))
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu").load_state_dict(model.state_dict())
    ids = random_ids((1, 9), kwargs["vocab_size"], seed=27)
    assert_close(meta.set_kernel_backend(BACKEND)(ids).logits, model.set_kernel_backend(BACKEND)(ids).logits)


def fused_ok(module):
    return module._is_fused() and all(module._fused_weight.untyped_storage().data_ptr()
                                      == linear.weight.untyped_storage().data_ptr() for linear in module._linears())


def test_fused_projections_survive_to_and_reloads():
    kwargs = config_kwargs("gqa_window5")
    ours, hf = make_pair(kwargs, seed=28)
    ids = random_ids((2, 11), kwargs["vocab_size"], seed=29)
    expected = hf_logits(hf, ids)
    attn, mlp = ours.model.layers[0].self_attn, ours.model.layers[0].mlp
    assert fused_ok(attn) and fused_ok(mlp)  # load_state_dict copies into the views
    assert_close(ours(ids).logits, expected)

    # assign=True replaces the weights: detected, run unfused, then fused again on request.
    ours.load_state_dict({k: v.clone() for k, v in hf.state_dict().items()}, assign=True)
    assert not attn._is_fused() and not ours.model.layers[0].self_attn._is_fused()
    assert_close(ours(ids).logits, expected)
    assert attn._fused_weight is None  # the stale buffer was released
    ours.fuse_projections()
    assert fused_ok(attn) and fused_ok(mlp)
    assert_close(ours(ids).logits, expected)

    ours.to(torch.bfloat16)
    assert fused_ok(attn) and fused_ok(mlp) and attn._fused_weight.dtype == torch.bfloat16
    ours.float()
    assert fused_ok(attn) and fused_ok(mlp)
    assert_close(ours(ids).logits, expected, atol=0.1, rtol=0.05)  # weights went through bf16


def test_parametrized_projection_weights_run_unfused():
    """A weight computed by a parametrization (not a parameter of its Linear) is noticed, and the
    projections run separately on the weight the parametrization gives, as transformers' do."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, weight):
            return 2 * weight

    kwargs = config_kwargs("gqa_window5")
    ours, hf = make_pair(kwargs, seed=32)
    ids = random_ids((2, 11), kwargs["vocab_size"], seed=33)
    for model in (ours, hf):
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        parametrize.register_parametrization(attn.k_proj, "weight", Doubled())
        parametrize.register_parametrization(mlp.up_proj, "weight", Doubled())
    attn, mlp = ours.model.layers[0].self_attn, ours.model.layers[0].mlp
    assert not attn._is_fused() and not mlp._is_fused()
    assert_close(ours(ids).logits, hf_logits(hf, ids))


def test_fuse_copies_weights_that_are_adjacent_but_separately_allocated():
    # A caching allocator (CUDA's) can place separately allocated weights back to back; fusing
    # must not read them as rows of one storage.
    kwargs = config_kwargs("gqa_window5")
    ours, hf = make_pair(kwargs, seed=28)
    ids = random_ids((2, 11), kwargs["vocab_size"], seed=29)
    attn = ours.model.layers[0].self_attn
    weights = [linear.weight.detach().clone() for linear in attn._linears()]
    arena = torch.cat([w.flatten() for w in weights]).numpy()
    offset = 0
    for linear, w in zip(attn._linears(), weights):  # one storage each, at consecutive addresses
        linear.weight.data = torch.from_numpy(arena[offset:offset + w.numel()]).view(w.shape)
        offset += w.numel()
    ours.fuse_projections()
    assert fused_ok(attn)
    assert_close(ours(ids).logits, hf_logits(hf, ids))


def test_bf16_on_cpu_is_close_to_transformers_fp32():
    kwargs = config_kwargs("gqa_window5")
    ours, hf = make_pair(kwargs, seed=30)
    ids = random_ids((2, 17), kwargs["vocab_size"], seed=31)
    logits = ours.to(torch.bfloat16)(ids).logits.float()
    expected = hf_logits(hf, ids)
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()


def test_auto_aliases_from_config_and_checkpoint_round_trip(tmp_path):
    kwargs = config_kwargs("gqa_window5")
    model = AutoModelForCausalLM.from_config(MistralConfig(**kwargs), dtype=torch.bfloat16)
    assert isinstance(model, MistralForCausalLM) and model.dtype == torch.bfloat16
    assert isinstance(AutoModel.from_config(MistralConfig(**kwargs)), MistralModel)

    ours, hf = make_pair(kwargs, seed=37)
    ours.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).set_kernel_backend(BACKEND)
    assert fused_ok(loaded.model.layers[1].self_attn) and fused_ok(loaded.model.layers[1].mlp)
    ids = random_ids((2, 9), kwargs["vocab_size"], seed=38)
    assert_close(loaded(ids).logits, hf_logits(hf, ids))


def test_unsupported_configs_and_backends_are_refused():
    with pytest.raises(NotImplementedError, match="hidden_act"):
        MistralForCausalLM(MistralConfig(**config_kwargs(hidden_act="gelu")))
    with pytest.raises(NotImplementedError, match="rope type"):
        MistralForCausalLM(MistralConfig(**config_kwargs(rope_parameters={"rope_type": "yarn", "factor": 2.0})))
    with pytest.raises(ValueError, match="kernel backend"):
        MistralForCausalLM(MistralConfig(**config_kwargs())).set_kernel_backend("triton")
    with pytest.raises(TypeError, match="MistralConfig"):
        MistralForCausalLM(transformers.MistralConfig(**config_kwargs()))


# ------------------------------------------------------------------------------------------------
# Config files of transformers 4.34 and 5.x
CONFIG_4_34 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}
CONFIG_5 = {
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "dtype": "bfloat16",
    "eos_token_id": 2, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "model_type": "mistral",
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "sliding_window": None,
    "tie_word_embeddings": False, "transformers_version": "5.0.0", "use_cache": True, "vocab_size": 131072,
    "some_future_key": [1, 2],
}


def test_config_defaults_are_transformers():
    ours, theirs = MistralConfig(), transformers.MistralConfig()
    for name in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                 "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
                 "tie_word_embeddings", "sliding_window", "attention_dropout", "num_labels", "problem_type"]:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 10000.0


@pytest.mark.parametrize("config_dict", [CONFIG_4_34, CONFIG_5], ids=["4.34", "5.x"])
def test_config_files_round_trip(tmp_path, config_dict):
    (tmp_path / "config.json").write_text(json.dumps(config_dict))
    config = AutoConfig.from_pretrained(tmp_path)
    theirs = transformers.MistralConfig.from_pretrained(tmp_path)
    for name in ["hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim", "sliding_window",
                 "rms_norm_eps", "vocab_size", "max_position_embeddings"]:
        assert getattr(config, name) == getattr(theirs, name), name
    assert config.rope_theta == theirs.rope_parameters["rope_theta"]
    assert config.dtype == "bfloat16" and config.architectures == ["MistralForCausalLM"]
    if "some_future_key" in config_dict:
        assert config.some_future_key == [1, 2]

    config.save_pretrained(tmp_path / "ours")
    again = MistralConfig.from_pretrained(tmp_path / "ours" / "config.json")
    assert again == config and again.to_dict() == config.to_dict()
    back = transformers.MistralConfig.from_pretrained(tmp_path / "ours")  # transformers reads ours
    assert back.rope_parameters["rope_theta"] == config.rope_theta and back.head_dim == config.head_dim
    assert back.sliding_window == config.sliding_window


def test_config_reads_transformers_own_file_and_llama(tmp_path):
    transformers.MistralConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, num_labels=5,
                               sliding_window=None,
                               rope_parameters={"rope_theta": 5e5, "rope_type": "default"}).save_pretrained(tmp_path)
    config = MistralConfig.from_pretrained(tmp_path)
    assert (config.head_dim, config.num_labels, config.sliding_window, config.rope_theta) == (16, 5, None, 5e5)
    llama = MistralConfig.from_dict({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                     "rope_theta": 1e5, "rope_scaling": None})
    assert llama.sliding_window is None and llama.rope_theta == 1e5 and llama.rope_type == "default"
    with pytest.raises(FileNotFoundError):
        MistralConfig.from_pretrained(tmp_path / "missing")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        MistralConfig.from_pretrained(tmp_path / "broken.json")


# ------------------------------------------------------------------------------------------------
# Bad input: a clear exception before any kernel runs, the cache left as it was
class _NoKernels:
    def __getattr__(self, name):
        raise AssertionError(f"kernel {name} ran before the inputs were validated")


@pytest.fixture
def guarded():
    kwargs = config_kwargs("gqa_window5")
    model, _ = make_pair(kwargs, seed=32)
    ids = random_ids((2, 6), kwargs["vocab_size"], seed=33)
    cache = model(ids).past_key_values
    model.model.kernel_backend = "guard"
    modeling._BACKENDS["guard"] = _NoKernels()
    yield model, ids, cache
    del modeling._BACKENDS["guard"]


@pytest.mark.parametrize("case,error,match", [
    ("id_too_large", ValueError, "vocab_size"),
    ("id_negative", ValueError, "vocab_size"),
    ("mask_shape", ValueError, "attention_mask must have shape"),
    ("mask_right_padded", ValueError, "left padding"),
    ("mask_values", ValueError, "only 0"),
    ("positions_before_cache", ValueError, "after the positions already"),
    ("positions_unordered", ValueError, "increase strictly"),
    ("positions_negative", ValueError, ">= 0"),
    ("positions_shape", ValueError, "position_ids must be"),
    ("both_inputs", ValueError, "exactly one"),
    ("no_inputs", ValueError, "exactly one"),
    ("float_ids", TypeError, "integer tensor"),
    ("ids_1d", TypeError, "integer tensor"),
    ("embeds_width", TypeError, "inputs_embeds"),
    ("empty", ValueError, "empty"),
    ("attentions", NotImplementedError, "output_attentions"),
    ("dynamic_cache", TypeError, "RollingCache"),
    ("tuple_cache", TypeError, "RollingCache"),
    ("other_cache_batch", ValueError, "rows"),
    ("labels_range", ValueError, "labels must lie"),
    ("labels_shape", ValueError, "labels must have the shape"),
])
def test_bad_inputs_raise_before_any_kernel(guarded, case, error, match):
    model, ids, cache = guarded
    vocab = model.config.vocab_size
    new = ids[:, :2]
    mask = torch.ones(2, 8, dtype=torch.long)
    calls = {
        "id_too_large": lambda: model(new + vocab, past_key_values=cache),
        "id_negative": lambda: model(new - vocab, past_key_values=cache),
        "mask_shape": lambda: model(new, attention_mask=torch.ones(2, 2), past_key_values=cache),
        "mask_right_padded": lambda: model(new, attention_mask=mask.index_fill(1, torch.tensor([3]), 0),
                                           past_key_values=cache),
        "mask_values": lambda: model(new, attention_mask=mask * 2, past_key_values=cache),
        "positions_before_cache": lambda: model(new, position_ids=torch.tensor([[5, 6]]), past_key_values=cache),
        "positions_unordered": lambda: model(new, position_ids=torch.tensor([[7, 6]]), past_key_values=cache),
        "positions_negative": lambda: model(ids, position_ids=torch.arange(-1, 5)[None]),
        "positions_shape": lambda: model(new, position_ids=torch.arange(3)[None], past_key_values=cache),
        "both_inputs": lambda: model(ids, inputs_embeds=torch.randn(2, 6, 64)),
        "no_inputs": lambda: model(attention_mask=mask),
        "float_ids": lambda: model(ids.float()),
        "ids_1d": lambda: model(ids[0]),
        "embeds_width": lambda: model(inputs_embeds=torch.randn(2, 6, 63)),
        "empty": lambda: model(ids[:, :0]),
        "attentions": lambda: model(ids, output_attentions=True),
        "dynamic_cache": lambda: model(new, past_key_values=transformers.DynamicCache()),
        "tuple_cache": lambda: model(new, past_key_values=((torch.zeros(2, 2, 6, 16),) * 2,) * 2),
        "other_cache_batch": lambda: model(ids[:1, :2], past_key_values=cache),
        "labels_range": lambda: model(ids, labels=ids + vocab),
        "labels_shape": lambda: model(ids, labels=ids[:, :3]),
    }
    before = (cache.get_seq_length(), cache.cache_lens.clone())
    with pytest.raises(error, match=match):
        calls[case]()
    assert cache.get_seq_length() == before[0] and torch.equal(cache.cache_lens, before[1])


def test_classification_labels_are_checked():
    kwargs = config_kwargs("gqa_window5", num_labels=3, pad_token_id=0)
    model, _ = make_pair(kwargs, MistralForSequenceClassification, transformers.MistralForSequenceClassification)
    ids = random_ids((2, 5), kwargs["vocab_size"], seed=34)
    with pytest.raises(ValueError, match="num_labels"):
        model(ids, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="one integer label per row"):
        model(ids, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="label value"):
        model(ids, labels=torch.ones(2, 2))


# ------------------------------------------------------------------------------------------------
# CUDA: bf16 against transformers' fp32 on the same weights, and a decode step with no host sync
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_bf16_close_to_transformers_fp32(head_dim):
    kwargs = dict(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=3,
                  num_attention_heads=512 // head_dim * 2, num_key_value_heads=2, head_dim=head_dim,
                  sliding_window=48, max_position_embeddings=1024, rms_norm_eps=1e-5)
    ours, hf = make_pair(kwargs, seed=35)
    ids = random_ids((2, 150), kwargs["vocab_size"], seed=36)
    expected = hf_logits(hf, ids)
    ours = ours.to(device="cuda", dtype=torch.bfloat16)
    scale = expected.abs().max()

    full = ours(ids.cuda()).logits.float().cpu()
    assert (full - expected).abs().max() < 0.05 * scale
    assert torch.nn.functional.cosine_similarity(full.flatten(), expected.flatten(), dim=0) > 0.999

    out = ours(ids[:, :100].cuda())
    cache, mask, token = out.past_key_values, torch.ones(2, 101, dtype=torch.long, device="cuda"), ids[:, 100:101].cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # the decode step generate() runs: nothing waits for the device
        step = ours(token, attention_mask=mask, position_ids=cache.cache_lens[:, None].long(),
                    past_key_values=cache, logits_to_keep=1, _trusted_input_ids=True).logits
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert (step.float().cpu()[:, 0] - expected[:, 100]).abs().max() < 0.05 * scale
    for t in range(101, 150):
        step = ours(ids[:, t:t + 1].cuda(), past_key_values=cache).logits
        assert (step.float().cpu()[:, 0] - expected[:, t]).abs().max() < 0.05 * scale
