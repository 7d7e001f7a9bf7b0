"""Model hyper-parameters for the Llama family (Llama 2/3, CodeLlama, Mistral, Qwen2, SmolLM2)."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DTYPES = ("float32", "bfloat16", "float16")
# Rematerialisation of the decoder layers in the backward pass (`ModelConfig.remat`):
#   none           keep every layer's activations (fastest, most memory)
#   layer          save only each layer's input; recompute the whole layer in the backward pass
#   dots_saveable  save the outputs of the weight matmuls (q/k/v/o, gate/up/down projections), recompute
#                  the rest (attention scores / softmax, norms, activations): between the two
#   auto           left for the memory planner (`reft_jax.memory`) to resolve before a run; a model
#                  traced while it is still "auto" behaves as "none"
RematSetting = Literal["none", "layer", "dots_saveable", "auto"]  # config annotation (+ bool for old files)
REMAT_CHOICES: tuple[str, ...] = get_args(RematSetting)


def normalize_remat(value: Any) -> str:
    """`ModelConfig.remat` as one of REMAT_CHOICES; the booleans of older configs and
    `model_config.json` files map True -> "layer", False -> "none"."""
    if isinstance(value, bool):
        return "layer" if value else "none"
    if isinstance(value, str) and value in REMAT_CHOICES:
        return value
    raise ValueError(f"model.remat must be one of {', '.join(REMAT_CHOICES)} (or true / false: "
                     f"layer / none), got {value!r}")


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int = 256
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    rope_theta: float = 10000.0
    # HF format, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    max_position_embeddings: int = 2048
    dtype: str = "float32"  # compute dtype; logits and values are always float32
    param_dtype: str = "float32"
    architecture: str = "LlamaForCausalLM"
    value_head_init: str = "torch_default"  # ReFT: PyTorch nn.Linear default; or "zeros"
    # none | layer | dots_saveable | auto (see REMAT_CHOICES); true / false are read as layer / none
    remat: RematSetting | bool = "none"

    def __post_init__(self) -> None:
        self.remat = normalize_remat(self.remat)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        normalize_remat(self.remat)
        if self.value_head_init not in ("torch_default", "zeros"):
            raise ValueError(f"value_head_init must be torch_default or zeros, got {self.value_head_init!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"rope_scaling type {kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
                )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def num_params(self, include_value_head: bool = True) -> int:
        d, f, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        q = d * self.num_heads * self.head_dim
        kv = 2 * d * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * d
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        layer = q + kv + o + bias + 3 * d * f + 2 * d
        total = v * d + l * layer + d + (0 if self.tie_word_embeddings else d * v)
        return total + ((d + 1) if include_value_head else 0)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from a transformers `config.json` mapping (v4 `rope_theta`/`rope_scaling` or v5
        `rope_parameters`)."""
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else {
            "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"
        }.get(hf.get("model_type", ""), str(hf.get("model_type")))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = hf["num_attention_heads"]
        rope_params = dict(hf.get("rope_parameters") or {})
        rope_theta = float(rope_params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = hf.get("rope_scaling") or (rope_params or None)
        if scaling is not None:
            scaling = dict(scaling)
            scaling.pop("rope_theta", None)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "default":
                scaling = None
        # Qwen2 always has q/k/v biases; Llama's `attention_bias` would also add an o_proj bias,
        # which this model does not have, so it is refused rather than silently dropped.
        attention_bias = arch == "Qwen2ForCausalLM"
        for flag in ("attention_bias", "mlp_bias"):
            if arch != "Qwen2ForCausalLM" and hf.get(flag):
                raise ValueError(f"config.json: {flag}=true is not supported for {arch}")
        kwargs: dict[str, Any] = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=rope_theta,
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            architecture=arch,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        model_type = {
            "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"
        }[self.architecture]
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.param_dtype,
        }
        if self.architecture == "LlamaForCausalLM":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        if self.architecture == "MistralForCausalLM":
            out["sliding_window"] = None
        if self.architecture == "Qwen2ForCausalLM":
            out["use_sliding_window"] = False
        return out
