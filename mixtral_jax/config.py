"""The model configuration: a frozen, validated dataclass, named presets, and
the mapping to and from Hugging Face's `config.json`.

Field names follow Hugging Face's MixtralConfig so that a config.json reads
without translation; the fields it lacks (`_OURS`: compute dtype, the MoE
compute path and capacity, the aux-loss form, the z-loss, remat, matmul
precision, the tokenizer) are ours and are dropped by `to_hf_config`, which
writes param_dtype as `torch_dtype`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

DTYPES = ("float32", "bfloat16", "float16")
MOE_IMPLS = ("auto", "grouped", "ragged", "reference")
AUX_LOSS_STYLES = ("pooled", "per_layer")
REMAT_POLICIES = ("none", "full", "dots")
MATMUL_PRECISIONS = ("float32", "tensorfloat32", "bfloat16", "default")


class ConfigError(ValueError):
    """A configuration that cannot describe a model; the message names the field."""


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    """Every size and numeric choice of a Mixtral model.

    Derived sizes (`q_dim`, `kv_dim`, `num_params` ...) are properties so that
    nothing can disagree with the fields they come from.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    # --- ours, not in Hugging Face's config.json ---
    router_z_loss_coef: float = 0.0
    aux_loss_style: Literal["pooled", "per_layer"] = "pooled"
    moe_impl: Literal["auto", "grouped", "ragged", "reference"] = "auto"
    capacity_factor: float = 0.0  # expert-parallel buffers; 0 = never drop
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    remat: Literal["none", "full", "dots"] = "none"
    # float32 matmuls: "float32" is exact on every backend (GPUs would otherwise use
    # TensorFloat-32 and TPUs one bfloat16 pass); bfloat16 inputs are unaffected
    matmul_precision: Literal["float32", "tensorfloat32", "bfloat16", "default"] = "float32"
    tokenizer: str = "mistral-v1"  # a name from tokenizer.TOKENIZERS or a .model path

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                    "num_local_experts", "num_experts_per_tok")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"model.{name} must be an id in [0, {self.vocab_size}), got {value!r}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0):
            raise ConfigError(f"model.head_dim must be a positive integer or null, got {self.head_dim!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads}); set head_dim")
        if self.head_size % 2:
            raise ConfigError(f"model.head_dim must be even for rotary embeddings, got {self.head_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"model.num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or isinstance(self.sliding_window, bool) or self.sliding_window <= 0):
            raise ConfigError(f"model.sliding_window must be a positive integer or null, "
                              f"got {self.sliding_window!r}")
        for name, strict in (("rope_theta", True), ("rms_norm_eps", True), ("initializer_range", True),
                             ("router_aux_loss_coef", False), ("router_z_loss_coef", False),
                             ("capacity_factor", False)):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or not (value > 0 if strict else value >= 0):  # NaN and inf fail too
                raise ConfigError(f"model.{name} must be a finite number {'> 0' if strict else '>= 0'}, "
                                  f"got {value!r}")
        choices = {"param_dtype": DTYPES, "dtype": DTYPES, "moe_impl": MOE_IMPLS,
                   "aux_loss_style": AUX_LOSS_STYLES, "remat": REMAT_POLICIES,
                   "matmul_precision": MATMUL_PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ConfigError(f"model.tokenizer must be a tokenizer name or a .model path, got {self.tokenizer!r}")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        """Per-head dimension H (explicit `head_dim`, else hidden_size / heads)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        """Width of the query projection's output: heads x head size."""
        return self.num_attention_heads * self.head_size

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection's output: kv heads x head size."""
        return self.num_key_value_heads * self.head_size

    def _layer_params(self, experts: int) -> int:
        d, f = self.hidden_size, self.intermediate_size
        attention = d * self.q_dim * 2 + d * self.kv_dim * 2
        router = d * self.num_local_experts
        return attention + router + experts * 3 * d * f + 2 * d

    @property
    def num_params(self) -> int:
        """Total parameters, counted from the shapes the model creates."""
        embed = 2 * self.vocab_size * self.hidden_size  # untied embedding and LM head
        return embed + self.hidden_size + self.num_hidden_layers * self._layer_params(self.num_local_experts)

    @property
    def num_active_params(self) -> int:
        """Parameters a token touches: every dense weight plus its top-k experts."""
        embed = 2 * self.vocab_size * self.hidden_size
        return embed + self.hidden_size + self.num_hidden_layers * self._layer_params(self.num_experts_per_tok)

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Matmul FLOPs per token, counting only the active experts.

        2 FLOPs per active weight (the embedding lookup is no matmul), plus the
        attention scores and weighted sum over the keys a token sees (half the
        sequence on average under the causal mask, at most the sliding window).
        Training is forward + backward = 3x the forward.
        """
        matmul_weights = self.num_active_params - self.vocab_size * self.hidden_size
        keys = seq_len / 2 if self.sliding_window is None else min(seq_len / 2, self.sliding_window)
        attention = 2 * 2 * self.num_hidden_layers * self.q_dim * keys
        forward = 2 * matmul_weights + attention
        return 3 * forward if training else forward

    # ---- Hugging Face --------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides) -> MixtralConfig:
        """Builds a config from a Hugging Face Mixtral `config.json` dict."""
        model_type = hf.get("model_type")
        if model_type != "mixtral":
            raise ConfigError(f"not a Mixtral config: model_type is {model_type!r}, expected 'mixtral'")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (Mixtral uses 'silu')")
        if hf.get("tie_word_embeddings", False):
            raise ConfigError("tie_word_embeddings=true is not supported (Mixtral unties them)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_type {rope['rope_type']!r} is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        hf_fields = fields - _OURS
        kwargs = {k: v for k, v in hf.items() if k in hf_fields}
        if "rope_theta" not in kwargs and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        if hf.get("torch_dtype") in ("bfloat16", "float16") or hf.get("dtype") in ("bfloat16", "float16"):
            kwargs.setdefault("param_dtype", hf.get("dtype") or hf.get("torch_dtype"))
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` dict that transformers' MixtralForCausalLM reads."""
        hf = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _OURS}
        hf["head_dim"] = self.head_size
        hf.update(
            architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_act="silu",
            tie_word_embeddings=False, attention_dropout=0.0, router_jitter_noise=0.0,
            output_router_logits=False, use_cache=True, torch_dtype=self.param_dtype,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        return hf

    def replace(self, **changes) -> MixtralConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (this project's names; `to_hf_config` gives Hugging Face's)."""
        return dataclasses.asdict(self)


_OURS = frozenset({"router_z_loss_coef", "aux_loss_style", "moe_impl", "capacity_factor",
                   "param_dtype", "dtype", "remat", "matmul_precision", "tokenizer"})


# ---- presets ------------------------------------------------------------------------------
def mixtral_8x7b(**overrides) -> MixtralConfig:
    """Mixtral 8x7B (and 8x7B-Instruct, which has the same config.json)."""
    return MixtralConfig(**overrides)


def mixtral_8x22b(**overrides) -> MixtralConfig:
    """Mixtral 8x22B (and 8x22B-Instruct): 56 layers, 48 heads, v3 tokenizer."""
    sizes = dict(vocab_size=32768, hidden_size=6144, intermediate_size=16384,
                 num_hidden_layers=56, num_attention_heads=48, num_key_value_heads=8,
                 max_position_embeddings=65536, router_aux_loss_coef=0.001,
                 tokenizer="mistral-v3")
    return MixtralConfig(**{**sizes, **overrides})


def tiny(**overrides) -> MixtralConfig:
    """A ~350k-parameter model for unit tests, fed token ids directly (vocab 256;
    configs/tiny.yaml widens it to 272 for the byte tokenizer)."""
    sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return MixtralConfig(**{**sizes, **overrides})


def demo(**overrides) -> MixtralConfig:
    """A few-million-parameter model with the real 32000-piece tokenizer; trains on a CPU."""
    sizes = dict(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return MixtralConfig(**{**sizes, **overrides})


def bench_tiny(**overrides) -> MixtralConfig:
    """The `bench-tiny` training benchmark model."""
    sizes = dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return MixtralConfig(**{**sizes, **overrides})


def bench_small(**overrides) -> MixtralConfig:
    """The `bench-small` training benchmark model."""
    sizes = dict(vocab_size=32000, hidden_size=512, intermediate_size=1792, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    return MixtralConfig(**{**sizes, **overrides})


PRESETS = {
    "mixtral-8x7b": mixtral_8x7b,
    "mixtral-8x7b-instruct": mixtral_8x7b,
    "mixtral-8x22b": mixtral_8x22b,
    "mixtral-8x22b-instruct": mixtral_8x22b,
    "tiny": tiny,
    "demo": demo,
    "bench-tiny": bench_tiny,
    "bench-small": bench_small,
}


def preset(name: str, **overrides) -> MixtralConfig:
    """The named preset with field overrides, e.g. `preset("tiny", num_hidden_layers=4)`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    _check_keys(overrides)
    return PRESETS[name](**overrides)


def _check_keys(settings: dict[str, Any]) -> None:
    """ConfigError naming the keys of `settings` that are no MixtralConfig field."""
    fields = {f.name for f in dataclasses.fields(MixtralConfig)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ConfigError(f"unknown model key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")


def from_section(section: dict[str, Any] | None) -> MixtralConfig:
    """The `model:` section of a run config: a `preset:` name plus field overrides,
    or (as written to a run's config.yaml) every field spelled out."""
    section = dict(section or {})
    name = section.pop("preset", None)
    if name is not None:
        return preset(name, **section)
    _check_keys(section)
    return MixtralConfig(**section)
