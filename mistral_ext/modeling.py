"""Mistral on mistral_ext's kernels, with transformers' class names, parameter names and forward.

Each decoder layer is one op, decoder_layer of mistral_ext.ops (or of mistral_ext.reference, see
set_kernel_backend), which chains the ops below, with h the residual stream (in the model dtype):

    q | k | v = rms_norm(h) @ W_qkv                     # one matmul; q, k, v are column views
    rotary_embedding_(q, k)                             # in place, on the views
    a         = attention(q, k, v, cache)               # sliding window over cache + chunk, GQA
    kv_cache_write_(cache, k, v)                        # ring buffer, slot = position % capacity
                                                        # (decode: rotary + write fused, before attention)
    h         = h + a @ W_o
    h         = h + silu_and_mul(rms_norm(h) @ W_gate|up) @ W_down

Every matmul goes through ops.linear, which also applies the norm or the activation before the
product and adds the residual after it: at decode our bandwidth-bound GEMV kernel does all of
it in one launch per projection, at prefill the vendor GEMM sits between our norm / activation
kernel and the add. The chain runs in C++, so a step costs one Python call per layer.

Positions, not a mask, say what attends to what: position_ids, or cumsum(attention_mask) - 1
over the whole [past + new] mask (transformers' generate rule), with padding marked -1. A decode
step therefore reads no value on the host, loops over no heads, builds no [seq x seq] mask and
never duplicates K/V. Inputs are validated before any kernel runs; the value checks (token ids in
the vocabulary, left padding, positions after the cache) read a few numbers on the host, which
generate() skips for the inputs it makes itself (`_trusted_input_ids=True`).

The models are for inference: forward runs without autograd (the kernels have no backward).
"""
import dataclasses
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import ops as kernel_ops
from . import reference
from .cache import RollingCache
from .config import MistralConfig
from .generation import GenerationMixin

_BACKENDS = {"kernels": kernel_ops, "reference": reference}
IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------------
# Outputs
class ModelOutput:
    """Base of the output dataclasses: attributes, plus transformers' key and index access over
    the fields that are set (`out["logits"]`, `out[0]`, `out.to_tuple()`)."""

    def _set_fields(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    def keys(self):
        return self._set_fields().keys()

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(self._set_fields().values())

    def __getitem__(self, key):
        return self._set_fields()[key] if isinstance(key, str) else self.to_tuple()[key]


@dataclasses.dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None           # [batch, tokens, hidden]
    past_key_values: Optional[RollingCache] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None   # embeddings + each layer's output


@dataclasses.dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None                      # [batch, tokens kept, vocab]
    past_key_values: Optional[RollingCache] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


@dataclasses.dataclass
class SequenceClassifierOutputWithPast(CausalLMOutputWithPast):
    """Same fields; logits are [batch, num_labels], pooled at each row's last non-pad token."""


# ------------------------------------------------------------------------------------------------
# Layers
class MistralRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.variance_epsilon)


def _weight_of(module: nn.Module) -> torch.Tensor:
    # Read for every layer and token: from the module dicts, as nn.Module's attribute lookup costs
    # several times more host time; a weight held elsewhere (a parametrization, pruning, a wrapping
    # module) through the attribute.
    weight = module._parameters.get("weight")
    return weight if weight is not None else module.weight


class FusedProjections(nn.Module):
    """A module whose input projections (the nn.Linear children named in `fused`) run as one matmul.

    fuse_projections() concatenates their weights (rows) into one buffer and re-points each
    weight at its slice of it: no second copy, parameter names and state_dict unchanged. A
    weight replaced afterwards (load_state_dict(assign=True), a loader) is noticed by its
    address: the stale buffer is released and the projections run separately until the next
    fuse_projections(). .to()/.half()/... convert weights one by one, so they re-fuse after.
    """

    fused: Tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self._fused_weight: Optional[torch.Tensor] = None
        self._fused_addresses: Tuple[int, ...] = ()

    def _linears(self):
        return [getattr(self, name) for name in self.fused]

    def _weight(self, name: str) -> torch.Tensor:
        return _weight_of(self._modules[name])

    def _addresses(self) -> Tuple[int, ...]:
        return tuple(self._weight(name).data_ptr() for name in self.fused)

    def _is_fused(self) -> bool:
        # The buffer is held here, so no other tensor can live at its addresses.
        return self._fused_weight is not None and self._addresses() == self._fused_addresses

    def fuse_projections(self) -> None:
        linears = self._linears()
        weights = [linear.weight.detach() for linear in linears]
        if _consecutive_rows(weights):  # already slices of one buffer (the loader allocates so)
            weight = weights[0].as_strided((sum(w.shape[0] for w in weights), weights[0].shape[1]),
                                           weights[0].stride())
        else:
            weight = torch.cat(weights)
        row = 0
        for linear in linears:
            linear.weight.data = weight[row:row + linear.out_features]
            row += linear.out_features
        self._fused_weight, self._fused_addresses = weight, self._addresses()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self._fused_weight is not None and not self._is_fused():
            self.fuse_projections()
        return self

    def projection_weights(self) -> List[torch.Tensor]:
        """What ops.decoder_layer takes for these projections: the fused weight, or while a weight
        replaced after fusing keeps them apart, each weight (the stale buffer is then released)."""
        if self._is_fused():
            return [self._fused_weight]
        self._fused_weight = None
        return [self._weight(name) for name in self.fused]


def _consecutive_rows(weights) -> bool:
    """True when the contiguous weights are consecutive rows of one storage. Adjacent addresses
    alone are not enough: a caching allocator (CUDA's) places separate tensors back to back."""
    storage = weights[0].untyped_storage()
    return all(w.is_contiguous() and w.dtype == weights[0].dtype
               and w.untyped_storage().data_ptr() == storage.data_ptr() for w in weights) and all(
        b.data_ptr() == a.data_ptr() + a.nbytes for a, b in zip(weights, weights[1:]))


class MistralAttention(FusedProjections):
    fused = ("q_proj", "k_proj", "v_proj")

    def __init__(self, config: MistralConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.rope_theta = config.rope_theta
        self.sliding_window = config.sliding_window
        hidden, q_size, kv_size = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_size, bias=False)
        self.k_proj = nn.Linear(hidden, kv_size, bias=False)
        self.v_proj = nn.Linear(hidden, kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, hidden, bias=False)
        self.fuse_projections()


class MistralMLP(FusedProjections):
    fused = ("gate_proj", "up_proj")

    def __init__(self, config: MistralConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.fuse_projections()


class MistralDecoderLayer(nn.Module):
    def __init__(self, config: MistralConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MistralAttention(config, layer_idx)
        self.mlp = MistralMLP(config)
        self.input_layernorm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, h: torch.Tensor, positions, cache, ops) -> torch.Tensor:
        """The residual stream h after the layer, one op (see the module docstring). Submodules are
        read from the module dict, as weights are (_weight_of): this runs for every layer and token."""
        modules = self._modules
        attn, mlp, input_norm = modules["self_attn"], modules["mlp"], modules["input_layernorm"]
        k_cache = v_cache = cache_lens = None
        if cache is not None:
            k_cache, v_cache = cache.key_cache[attn.layer_idx], cache.value_cache[attn.layer_idx]
            cache_lens = cache.cache_lens
        # Both norms take config.rms_norm_eps; the op takes one eps.
        return ops.decoder_layer(h, positions, k_cache, v_cache, cache_lens, _weight_of(input_norm),
                                 attn.projection_weights(), attn._weight("o_proj"),
                                 _weight_of(modules["post_attention_layernorm"]), mlp.projection_weights(),
                                 mlp._weight("down_proj"), attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                 input_norm.variance_epsilon, attn.rope_theta, attn.sliding_window, attn.scaling)


# ------------------------------------------------------------------------------------------------
# Models
def _check_supported(config: MistralConfig) -> None:
    if config.hidden_act not in ("silu", "swish"):
        raise NotImplementedError(f"hidden_act={config.hidden_act!r} is not supported (the MLP kernel is SiLU)")
    if config.rope_type != "default":
        raise NotImplementedError(f"rope type {config.rope_type!r} is not supported (only the default RoPE)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise NotImplementedError(f"{flag}=True is not supported (Mistral's projections have no bias)")
    if config.head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {config.head_dim}")


class MistralPreTrainedModel(nn.Module):
    """Base class: config, init, checkpoint I/O, kernel backend and projection fusion."""

    config_class = MistralConfig
    base_model_prefix = "model"

    def __init__(self, config: MistralConfig):
        super().__init__()
        if not isinstance(config, MistralConfig):
            raise TypeError(f"config must be a mistral_ext.MistralConfig, got {type(config).__name__}")
        _check_supported(config)
        self.config = config

    @property
    def base_model(self) -> "MistralModel":
        return getattr(self, self.base_model_prefix, self)

    @property
    def device(self) -> torch.device:
        return self.base_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base_model.embed_tokens.weight.dtype

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' init: normal(0, initializer_range) weights, zero padding row, unit norms."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, MistralRMSNorm):
            module.weight.fill_(1.0)

    def fuse_projections(self) -> None:
        """(Re)builds the fused q|k|v and gate|up weights, e.g. after loading weights."""
        for module in self.modules():
            if isinstance(module, FusedProjections):
                module.fuse_projections()

    def set_kernel_backend(self, backend: str) -> "MistralPreTrainedModel":
        """Runs the model on "kernels" (mistral_ext.ops, the default) or on "reference"
        (mistral_ext.reference: plain PyTorch, for debugging a kernel)."""
        if backend not in _BACKENDS:
            raise ValueError(f"kernel backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
        self.base_model.kernel_backend = backend
        return self

    @classmethod
    def from_pretrained(cls, path=None, **kwargs):
        """Loads a checkpoint directory or file (see mistral_ext.loading.load_pretrained)."""
        from . import loading
        return loading.load_pretrained(cls, path, **kwargs)

    def save_pretrained(self, directory, **kwargs) -> None:
        """Writes config.json and safetensors weights (see mistral_ext.loading.save_pretrained)."""
        from . import loading
        loading.save_pretrained(self, directory, **kwargs)

    @classmethod
    def from_config(cls, config: MistralConfig, dtype: Optional[torch.dtype] = None,
                    torch_dtype: Optional[torch.dtype] = None):
        """A randomly initialised model (transformers' from_config), optionally in `dtype`."""
        model = cls(config)
        dtype = dtype or torch_dtype
        return model if dtype is None else model.to(dtype)


class MistralModel(MistralPreTrainedModel):
    """The decoder stack without a head: returns the final hidden states."""

    def __init__(self, config: MistralConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(MistralDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.kernel_backend = "kernels"
        self.apply(self._init_weights)

    @torch.no_grad()
    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_values: Optional[RollingCache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, _trusted_input_ids: bool = False):
        config = self.config
        use_cache = config.use_cache if use_cache is None else use_cache
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        batch, tokens = self._check_shapes(input_ids, attention_mask, position_ids, past_key_values,
                                           inputs_embeds, output_attentions)
        device, dtype = self.device, self.dtype

        cache = past_key_values if past_key_values is not None else RollingCache(config) if use_cache else None
        past = 0 if cache is None else cache.get_seq_length()
        mask = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
        if position_ids is not None:
            position_ids = position_ids.to(device=device, dtype=torch.long).expand(batch, tokens)
        positions = _positions(mask, position_ids, past, batch, tokens, device)
        if _trusted_input_ids:
            needed = past + tokens  # generate's positions never exceed the tokens fed
        else:
            needed = self._check_values(input_ids, mask, position_ids, positions, cache)
        if cache is not None:
            cache.reserve(batch, needed, dtype, device)

        ops = _BACKENDS[self.kernel_backend]
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.to(dtype).contiguous()
        hidden_states = (x,) if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, cache, ops)
            if output_hidden_states and i + 1 < len(self.layers):
                hidden_states += (x,)
        if cache is not None:
            cache.advance(positions)
        x = self.norm(x, ops)
        if output_hidden_states:
            hidden_states += (x,)

        out = BaseModelOutputWithPast(last_hidden_state=x, past_key_values=cache if use_cache else None,
                                      hidden_states=hidden_states)
        return out if return_dict else out.to_tuple()

    def _check_shapes(self, input_ids, attention_mask, position_ids, cache, inputs_embeds,
                      output_attentions) -> Tuple[int, int]:
        """Argument checks that need no device data; returns (batch, tokens)."""
        if output_attentions:
            raise NotImplementedError("output_attentions=True is not supported: the fused attention "
                                      "kernels never materialise the attention weights")
        _one_input(input_ids, inputs_embeds)
        config = self.config
        if cache is not None:
            if not isinstance(cache, RollingCache):
                raise TypeError("past_key_values must be the mistral_ext.RollingCache returned by an earlier "
                                f"call with use_cache=True, got {type(cache).__name__} (transformers' caches "
                                "and legacy tuples are not supported)")
            if (cache.num_layers, cache.num_kv_heads, cache.head_dim, cache.sliding_window) != (
                    config.num_hidden_layers, config.num_key_value_heads, config.head_dim, config.sliding_window):
                raise ValueError(f"past_key_values ({cache}) was made for another model configuration")
        device = self.device
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex() \
                    or input_ids.dtype == torch.bool or input_ids.dim() != 2:
                raise TypeError("input_ids must be an integer tensor [batch, tokens], got "
                                + _describe(input_ids))
            inputs, name = input_ids, "input_ids"
        else:
            if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point() \
                    or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
                raise TypeError(f"inputs_embeds must be a float tensor [batch, tokens, {config.hidden_size}], "
                                f"got {_describe(inputs_embeds)}")
            inputs, name = inputs_embeds, "inputs_embeds"
        if inputs.device != device:
            raise ValueError(f"{name} is on {inputs.device} but the model is on {device}: move it with .to()")
        batch, tokens = inputs.shape[:2]
        if batch == 0 or tokens == 0:
            raise ValueError(f"{name} is empty (shape {list(inputs.shape)})")
        past = 0 if cache is None else cache.get_seq_length()
        if cache is not None and cache.batch_size not in (None, batch):
            raise ValueError(f"past_key_values holds {cache.batch_size} rows but {name} has {batch}")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, past + tokens):
                raise ValueError(f"attention_mask must have shape [batch, past + new tokens] = [{batch}, "
                                 f"{past + tokens}] ({past} tokens in past_key_values), got "
                                 f"{_describe(attention_mask)}")
        if position_ids is not None:
            if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point() \
                    or position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) \
                    or position_ids.shape[1] != tokens:
                raise ValueError(f"position_ids must be an integer tensor [{batch} or 1, {tokens}], got "
                                 f"{_describe(position_ids)}")
        return batch, tokens

    def _check_values(self, input_ids, mask, position_ids, positions, cache) -> int:
        """Checks that read values, with a single device->host copy; returns max position + 1."""
        tokens = positions.shape[1]
        valid = positions >= 0
        names, values = ["max position"], [positions.max()]
        if input_ids is not None:
            names += ["min id", "max id"]
            values += [input_ids.min(), input_ids.max()]
        if mask is not None:
            names += ["mask values", "right padding"]
            values += [((mask != 0) & (mask != 1)).any(), (mask[:, 1:] < mask[:, :-1]).any()]
        if position_ids is not None:
            kept = torch.ones_like(valid) if mask is None else mask[:, -tokens:] != 0
            names += ["negative positions", "unordered positions"]
            values += [((position_ids < 0) & kept).any(),
                       ((position_ids[:, 1:] <= position_ids[:, :-1]) & kept[:, 1:] & kept[:, :-1]).any()]
        if cache is not None and cache.cache_lens is not None:
            names.append("positions before cache")
            values.append((valid & (positions < cache.cache_lens[:, None])).any())
        got = dict(zip(names, torch.stack([v.long() for v in values]).tolist()))

        vocab = self.config.vocab_size
        if input_ids is not None and (got["min id"] < 0 or got["max id"] >= vocab):
            raise ValueError(f"input_ids must lie in [0, {vocab}) (vocab_size), got values from "
                             f"{got['min id']} to {got['max id']}")
        if got.get("mask values"):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        if got.get("right padding"):
            raise ValueError("attention_mask must use left padding: a row has a 0 after a 1 (pad on the "
                             "left, e.g. tokenizer(..., padding_side='left'))")
        if got.get("negative positions"):
            raise ValueError("position_ids must be >= 0 for the tokens the attention_mask keeps")
        if got.get("unordered positions"):
            raise ValueError("position_ids must increase strictly along each row")
        if got.get("positions before cache"):
            raise ValueError("position_ids (given or derived from attention_mask) must come after the "
                             "positions already in past_key_values")
        return max(got["max position"] + 1, 1)


def _one_input(input_ids, inputs_embeds):
    """The one of input_ids and inputs_embeds that is given."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    return input_ids if input_ids is not None else inputs_embeds


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def _positions(mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor], past: int,
               batch: int, tokens: int, device: torch.device) -> torch.Tensor:
    """Positions of the new tokens, int64 [batch, tokens], -1 for padding: position_ids, else
    cumsum(attention_mask) - 1 over [past + new] (transformers' generate), else past + arange."""
    if mask is not None:
        if position_ids is None:
            position_ids = mask.cumsum(-1)[:, -tokens:] - 1
        return torch.where(mask[:, -tokens:] != 0, position_ids, -1)
    if position_ids is None:
        position_ids = torch.arange(past, past + tokens, device=device).expand(batch, tokens)
    return position_ids.contiguous()


class MistralForCausalLM(MistralPreTrainedModel, GenerationMixin):
    """The decoder with its language-model head; generate() comes from GenerationMixin."""

    def __init__(self, config: MistralConfig):
        super().__init__(config)
        self.model = MistralModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights(self.lm_head)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_values: Optional[RollingCache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                logits_to_keep: Union[int, torch.Tensor] = 0, _trusted_input_ids: bool = False):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if labels is not None:
            _check_lm_labels(labels, _one_input(input_ids, inputs_embeds), logits_to_keep, self.config.vocab_size)
        outputs = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                             output_attentions, output_hidden_states, return_dict=True,
                             _trusted_input_ids=_trusted_input_ids)
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = _BACKENDS[self.model.kernel_backend].linear(hidden[:, keep], self.lm_head.weight)
        loss = None if labels is None else causal_lm_loss(logits, labels.to(logits.device))
        out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                     hidden_states=outputs.hidden_states)
        return out if return_dict else out.to_tuple()


def _check_lm_labels(labels: torch.Tensor, inputs, logits_to_keep, vocab: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
        raise TypeError(f"labels must be an integer tensor, got {_describe(labels)}")
    if isinstance(inputs, torch.Tensor) and tuple(labels.shape) != tuple(inputs.shape[:2]):
        raise ValueError(f"labels must have the shape of input_ids {list(inputs.shape[:2])}, "
                         f"got {list(labels.shape)}")
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError("labels need the logits of every token: leave logits_to_keep at 0")
    if bool(((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))).any()):
        raise ValueError(f"labels must lie in [0, {vocab}) or be {IGNORE_INDEX} (ignored)")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy in fp32: logits at t predict labels at t + 1; -100 is ignored."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


class MistralForSequenceClassification(MistralPreTrainedModel):
    """The decoder with a linear head on each row's last non-pad token (transformers' rule)."""

    def __init__(self, config: MistralConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MistralModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self._init_weights(self.score)

    @torch.no_grad()
    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_values: Optional[RollingCache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                use_cache: Optional[bool] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None):
        config = self.config
        return_dict = config.return_dict if return_dict is None else return_dict
        inputs = _one_input(input_ids, inputs_embeds)
        batch = inputs.shape[0] if isinstance(inputs, torch.Tensor) else None
        if config.pad_token_id is None and batch not in (None, 1):
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if labels is not None and batch is not None:
            problem = _problem_type(config, labels)
            _check_classification_labels(labels, problem, batch, config.num_labels)
        outputs = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                             output_attentions, output_hidden_states, return_dict=True)
        hidden = outputs.last_hidden_state
        if config.pad_token_id is None or input_ids is None:
            last = torch.full((batch,), hidden.shape[1] - 1, device=hidden.device)
        else:  # the rightmost token that is not padding, whichever side the padding is on
            non_pad = (input_ids != config.pad_token_id).int()
            last = (torch.arange(input_ids.shape[1], device=hidden.device, dtype=torch.int32) * non_pad).argmax(-1)
        logits = self.score(hidden[torch.arange(batch, device=hidden.device), last])
        loss = None if labels is None else classification_loss(logits, labels.to(logits.device), problem)
        out = SequenceClassifierOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                               hidden_states=outputs.hidden_states)
        return out if return_dict else out.to_tuple()


_PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def _problem_type(config: MistralConfig, labels: torch.Tensor) -> str:
    """config.problem_type, or transformers' inference from num_labels and the labels' dtype."""
    if config.problem_type is not None:
        if config.problem_type not in _PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {_PROBLEM_TYPES}, got {config.problem_type!r}")
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def _check_classification_labels(labels, problem: str, batch: int, num_labels: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if problem == "single_label_classification":
        if labels.is_floating_point() or labels.numel() != batch:
            raise ValueError(f"single-label classification needs one integer label per row ({batch}), "
                             f"got {_describe(labels)}")
        if bool(((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_labels))).any()):
            raise ValueError(f"labels must lie in [0, {num_labels}) (num_labels) or be {IGNORE_INDEX}")
    elif labels.numel() != batch * num_labels:
        raise ValueError(f"{problem} needs {num_labels} label value(s) per row, got {_describe(labels)}")


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem: str) -> torch.Tensor:
    """transformers' ForSequenceClassificationLoss, in fp32."""
    logits = logits.float()
    if problem == "regression":
        labels = labels.float()
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels.view_as(logits))
    if problem == "single_label_classification":
        return F.cross_entropy(logits, labels.view(-1), ignore_index=IGNORE_INDEX)
    return F.binary_cross_entropy_with_logits(logits, labels.float().view_as(logits))


class _AutoClass:
    """transformers' Auto* entry points for the seed's snippets: every checkpoint here is Mistral's graph."""

    model_class = None

    @classmethod
    def from_pretrained(cls, path=None, **kwargs):
        return cls.model_class.from_pretrained(path, **kwargs)

    @classmethod
    def from_config(cls, config: MistralConfig, **kwargs):
        return cls.model_class.from_config(config, **kwargs)


class AutoModelForCausalLM(_AutoClass):
    model_class = MistralForCausalLM


class AutoModel(_AutoClass):
    model_class = MistralModel
