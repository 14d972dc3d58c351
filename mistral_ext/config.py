"""MistralConfig: the model's hyper-parameters, read from and written to config.json.

Reads the config.json files that transformers 4.34 through 5.x write for Mistral (and Llama,
whose graph is Mistral's without a sliding window): `rope_theta` or
`rope_parameters={"rope_theta": .., "rope_type": "default"}`, `torch_dtype` or `dtype`,
`sliding_window` null. Unknown keys are kept as attributes and written back.
"""
import copy
import json
import os
from typing import Any, Dict, Optional, Union

import torch

CONFIG_NAME = "config.json"

# Field -> default, in the order of transformers' MistralConfig (plus head_dim and the
# classification and output fields of its base class).
_DEFAULTS: Dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 4096 * 32,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "attention_dropout": 0.0,
    "num_labels": 2,
    "problem_type": None,
    "output_hidden_states": False,
    "return_dict": True,
    "dtype": None,
}

# Keys transformers writes that say nothing about this model's shape.
_DROPPED_KEYS = ("transformers_version", "_name_or_path", "_commit_hash", "attn_implementation",
                 "_attn_implementation", "_attn_implementation_autoset")


def _dtype_name(dtype: Union[None, str, torch.dtype]) -> Optional[str]:
    if dtype is None or isinstance(dtype, str):
        return dtype
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    raise TypeError(f"dtype must be a torch.dtype or its name, got {dtype!r}")


class MistralConfig:
    """Configuration of a Mistral model; the defaults are Mistral-7B-v0.1's."""

    model_type = "mistral"

    def __init__(self, **kwargs):
        kwargs = dict(kwargs)
        # 5.x: rope_parameters holds rope_theta and the rope type; 4.x: rope_theta + rope_scaling.
        rope_parameters = kwargs.pop("rope_parameters", None)
        rope_scaling = kwargs.pop("rope_scaling", None)
        rope = dict(rope_parameters or rope_scaling or {})
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope.pop("rope_theta")
        rope.setdefault("rope_type", rope.pop("type", "default"))
        self._rope = rope
        if "torch_dtype" in kwargs:
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        id2label = kwargs.get("id2label")
        if id2label is not None and "num_labels" not in kwargs:
            kwargs["num_labels"] = len(id2label)
        for key in _DROPPED_KEYS:
            kwargs.pop(key, None)

        for name, default in _DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        self.dtype = _dtype_name(self.dtype)
        self.rope_theta = float(self.rope_theta)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        for name, value in kwargs.items():  # unknown keys are kept, as transformers does
            setattr(self, name, value)

    @property
    def rope_type(self) -> str:
        return self._rope["rope_type"]

    @property
    def rope_parameters(self) -> Dict[str, Any]:
        return {"rope_theta": self.rope_theta, **self._rope}

    # -- dict / json -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], **kwargs) -> "MistralConfig":
        values = {**copy.deepcopy(config_dict), **kwargs}
        if values.get("model_type") == "llama":  # Llama: no window, as many kv heads as heads by default
            values.setdefault("sliding_window", None)
            values.setdefault("num_key_value_heads", None)
        if values.get("model_type") == cls.model_type:
            values.pop("model_type")
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        """Every field, in transformers 5.x style; `rope_theta` is written too for 4.x readers."""
        out = {"model_type": self.model_type}
        out.update(copy.deepcopy({k: v for k, v in vars(self).items() if not k.startswith("_")}))
        out["rope_parameters"] = self.rope_parameters
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json_file(cls, path: Union[str, os.PathLike], **kwargs) -> "MistralConfig":
        try:
            with open(path, encoding="utf-8") as f:
                config_dict = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(config_dict, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(config_dict).__name__}")
        return cls.from_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **kwargs) -> "MistralConfig":
        """Reads `path/config.json` (or `path` itself when it is a file); kwargs override fields."""
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path}")
        return cls.from_json_file(file, **kwargs)

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> str:
        """Writes `directory/config.json` (creating the directory) and returns its path."""
        os.makedirs(directory, exist_ok=True)
        file = os.path.join(directory, CONFIG_NAME)
        with open(file, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return file

    def __eq__(self, other) -> bool:
        return isinstance(other, MistralConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


class AutoConfig:
    """transformers' AutoConfig for the snippets that use it: every config here is a MistralConfig."""

    @staticmethod
    def from_pretrained(path: Union[str, os.PathLike], **kwargs) -> MistralConfig:
        return MistralConfig.from_pretrained(path, **kwargs)

    @staticmethod
    def for_model(model_type: str = "mistral", **kwargs) -> MistralConfig:
        return MistralConfig.from_dict({"model_type": model_type, **kwargs})
