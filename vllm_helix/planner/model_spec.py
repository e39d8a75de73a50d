"""Model specs: the shape of a transformer, read from a Hugging Face ``config.json`` or a preset.

The cost model needs only parameter counts per projection, KV elements per token
and FLOPs per attended token, so a model is reduced to the handful of fields that
determine those. Presets under ``configs/models/*.yaml`` carry a verbatim subset of
the real ``config.json`` under ``config:``, so presets and user files go through
the same reader (:func:`spec_from_hf_config`) and cannot drift apart.

Two attention families are understood:

* GQA/MHA (Llama, Mistral, Qwen, Mixtral): ``num_key_value_heads`` KV heads of
  ``head_dim`` shared by groups of query heads.
* MLA (DeepSeek-V2/V3/R1): one compressed latent of ``kv_lora_rank`` +
  ``qk_rope_head_dim`` elements per token shared by every query head, i.e. one KV
  head. Decode runs in the weight-absorbed form, so attention reads the latent
  and the partial output per head has ``kv_lora_rank`` elements.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from vllm_helix.planner.errors import PlannerError
from vllm_helix.planner.precision import canonical_dtype

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"
MODEL_PRESET_DIR = CONFIG_ROOT / "models"


@dataclass(frozen=True)
class ModelSpec:
    """The decode-relevant shape of a decoder-only transformer.

    MoE fields are zero for dense models. ``first_dense_layers`` of an MoE model use
    the dense FFN of ``intermediate_size`` (DeepSeek's ``first_k_dense_replace``).
    ``shared_expert_intermediate_size`` is the total width of the always-on shared
    expert(s). ``q_lora_rank`` is 0 when queries are projected directly.
    """

    name: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    attention: str = "gqa"  # "gqa" or "mla"
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    q_lora_rank: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    first_dense_layers: int = 0
    tie_word_embeddings: bool = False
    dtype: str = "bf16"  # the checkpoint's weight format (fp8 for DeepSeek-R1's fp8 checkpoint)
    # What vLLM's ``--kv-cache-dtype auto`` stores, the only KV format Helix serves: the model's own
    # dtype (``torch_dtype``), bf16 for DeepSeek-R1 although its weights are fp8.
    kv_cache_dtype: str = "bf16"
    source: str = ""  # HF id or path: what `vllm-helix serve` is given
    max_position_embeddings: int = 0  # the config's position limit; 0 where it states none

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "vocab_size", "num_q_heads", "num_kv_heads",
                      "head_dim", "intermediate_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise PlannerError(f"model {self.name!r}: {field}={value!r} must be a positive integer")
        if self.attention not in ("gqa", "mla"):
            raise PlannerError(f"model {self.name!r}: attention must be 'gqa' or 'mla', got {self.attention!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise PlannerError(
                f"model {self.name!r}: {self.num_q_heads} query heads are not divisible by "
                f"{self.num_kv_heads} KV heads (each KV head must serve a whole group of query heads); "
                f"check num_attention_heads / num_key_value_heads in the config"
            )
        if self.is_mla and (self.kv_lora_rank < 1 or self.v_head_dim < 1):
            raise PlannerError(f"model {self.name!r}: MLA needs kv_lora_rank and v_head_dim > 0")
        if self.num_experts:
            if not 1 <= self.experts_per_token <= self.num_experts or self.moe_intermediate_size < 1:
                raise PlannerError(
                    f"model {self.name!r}: MoE needs 1 <= num_experts_per_tok <= {self.num_experts} "
                    f"and moe_intermediate_size > 0"
                )
            if not 0 <= self.first_dense_layers <= self.num_layers:
                raise PlannerError(
                    f"model {self.name!r}: first_k_dense_replace={self.first_dense_layers} exceeds "
                    f"{self.num_layers} layers"
                )

    # ------------------------------------------------------------------ kinds
    @property
    def is_mla(self) -> bool:
        return self.attention == "mla"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers if self.is_moe else 0

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    def layer_kinds(self) -> list[str]:
        """``"dense"`` or ``"moe"`` for each layer, in order (pipeline stages cut this list)."""
        return ["dense"] * self.num_dense_layers + ["moe"] * self.num_moe_layers

    # ------------------------------------------------------------ attention
    @property
    def value_head_dim(self) -> int:
        """Output elements per head after attention (what ``o_proj`` consumes)."""
        return self.v_head_dim if self.is_mla else self.head_dim

    @property
    def latent_projection_params(self) -> int:
        """MLA's down-projections (``q_a_proj``, ``kv_a_proj_with_mqa``).

        Their outputs are shared by every head, so tensor parallelism cannot split
        them: every attention rank holds and reads all of them (vLLM: ReplicatedLinear).
        """
        if not self.is_mla:
            return 0
        return self.hidden_size * (self.q_lora_rank + self.kv_lora_rank + self.qk_rope_head_dim)

    @property
    def query_head_params(self) -> int:
        """Projection weights that split with the query heads (vLLM: column-parallel).

        GQA: ``q_proj``. MLA: ``q_b_proj`` (or ``q_proj``) and ``kv_b_proj``, whose
        key half is absorbed into the query and value half into the output in decode.
        """
        if not self.is_mla:
            return self.hidden_size * self.num_q_heads * self.head_dim
        q_in = self.q_lora_rank or self.hidden_size
        q_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.num_q_heads * (q_in * q_dim + self.kv_lora_rank * (self.qk_nope_head_dim + self.v_head_dim))

    @property
    def kv_head_params(self) -> int:
        """GQA's ``k_proj`` + ``v_proj``: split with the KV heads, replicated beyond them."""
        return 0 if self.is_mla else 2 * self.hidden_size * self.num_kv_heads * self.head_dim

    @property
    def output_projection_params(self) -> int:
        """``o_proj``: row-parallel over whichever ranks hold the complete heads."""
        return self.num_q_heads * self.value_head_dim * self.hidden_size

    @property
    def kv_elements_per_token(self) -> int:
        """KV-cache elements one token adds to one layer (all KV heads)."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def decode_flops_per_context_token(self) -> int:
        """FLOPs one query head spends on one cached token in decode (QK^T plus PV).

        MLA in absorbed form scores against the whole latent (rope part included)
        and accumulates values in the ``kv_lora_rank`` space.
        """
        if self.is_mla:
            return 2 * (self.kv_lora_rank + self.qk_rope_head_dim) + 2 * self.kv_lora_rank
        return 4 * self.head_dim

    @property
    def prefill_flops_per_context_token(self) -> int:
        """FLOPs one query head spends on one earlier token in prefill (MLA runs as MHA there)."""
        if self.is_mla:
            return 2 * (self.qk_nope_head_dim + self.qk_rope_head_dim) + 2 * self.v_head_dim
        return 4 * self.head_dim

    @property
    def partial_output_elements(self) -> int:
        """Elements of one head's partial attention output exchanged between KVP ranks."""
        return self.kv_lora_rank if self.is_mla else self.head_dim

    # ------------------------------------------------------------------ FFN
    @property
    def dense_ffn_params(self) -> int:
        """Gate, up and down projections of a dense (SwiGLU) FFN."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def shared_expert_params(self) -> int:
        return 3 * self.hidden_size * self.shared_expert_intermediate_size

    @property
    def router_params(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def embedding_params(self) -> int:
        """Input embedding plus LM head (one table when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def attention_params(self) -> int:
        return (self.latent_projection_params + self.query_head_params + self.kv_head_params
                + self.output_projection_params)

    @property
    def total_params(self) -> int:
        """All weights (norms and biases ignored): a check against the published size."""
        moe = self.num_experts * self.expert_params + self.shared_expert_params + self.router_params
        return (self.num_layers * self.attention_params + self.num_dense_layers * self.dense_ffn_params
                + self.num_moe_layers * moe + self.embedding_params)

    @property
    def active_params_per_token(self) -> int:
        """Weights one token multiplies through (routed experts: only its top-k)."""
        moe = self.experts_per_token * self.expert_params + self.shared_expert_params + self.router_params
        return (self.num_layers * self.attention_params + self.num_dense_layers * self.dense_ffn_params
                + self.num_moe_layers * moe + self.lm_head_params)

    def describe(self) -> str:
        attention = (f"MLA latent {self.kv_lora_rank}+{self.qk_rope_head_dim}" if self.is_mla
                     else f"GQA {self.num_kv_heads} KV heads x {self.head_dim}")
        ffn = (f"{self.num_experts} experts (top-{self.experts_per_token}) x {self.moe_intermediate_size}"
               if self.is_moe else f"dense FFN {self.intermediate_size}")
        params = self.total_params
        size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
        return (f"{self.name}: {size} params, {self.num_layers} layers, "
                f"hidden {self.hidden_size}, {self.num_q_heads} query heads, {attention}, {ffn}")


# --------------------------------------------------------------------- readers
def _field(config: Mapping[str, Any], name: str, where: str, default: Any = None) -> Any:
    value = config.get(name, default)
    if value is None:
        raise PlannerError(f"{where}: config has no {name!r}; is this a decoder-only LLM config.json?")
    return value


def _config_dtype(config: Mapping[str, Any]) -> str:
    """The checkpoint's weight format: FP8 quantization config wins over torch_dtype."""
    quant = config.get("quantization_config") or {}
    if str(quant.get("quant_method", "")).lower() == "fp8" or str(quant.get("fmt", "")).lower() == "e4m3":
        return "fp8"
    return _model_dtype(config)


def _model_dtype(config: Mapping[str, Any]) -> str:
    """The model's own dtype (``torch_dtype``): what vLLM computes in and stores the KV cache in by default."""
    raw = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    try:
        return canonical_dtype(raw)
    except PlannerError:
        return "bf16"


def spec_from_hf_config(config: Mapping[str, Any], name: str, source: str = "") -> ModelSpec:
    """Build a :class:`ModelSpec` from the fields of a Hugging Face ``config.json``.

    Multimodal wrappers keep the language model under ``text_config``; that part is
    read. MoE fields follow DeepSeek (``n_routed_experts``), Mixtral
    (``num_local_experts``) or Qwen-MoE (``num_experts``) naming.
    """
    if not isinstance(config, Mapping):
        raise PlannerError(f"{name}: config must be a JSON object, got {type(config).__name__}")
    if isinstance(config.get("text_config"), Mapping):
        config = {**config, **config["text_config"]}
    where = f"model {name!r}"
    hidden = int(_field(config, "hidden_size", where))
    q_heads = int(_field(config, "num_attention_heads", where))
    is_mla = bool(config.get("kv_lora_rank"))
    kv_heads = 1 if is_mla else int(config.get("num_key_value_heads") or q_heads)
    head_dim = int(config.get("head_dim") or 0) or (hidden // q_heads)
    if is_mla:
        head_dim = int(_field(config, "qk_nope_head_dim", where)) + int(_field(config, "qk_rope_head_dim", where))
    experts = int(config.get("n_routed_experts") or config.get("num_local_experts")
                  or config.get("num_experts") or 0)
    moe_inter = 0
    shared_inter = 0
    first_dense = 0
    if experts:
        # Mixtral has no separate expert width: its intermediate_size is the expert's.
        moe_inter = int(config.get("moe_intermediate_size") or _field(config, "intermediate_size", where))
        shared_inter = int(config.get("shared_expert_intermediate_size")
                           or (config.get("n_shared_experts") or 0) * moe_inter)
        first_dense = int(config.get("first_k_dense_replace") or 0)
    return ModelSpec(
        name=name,
        num_layers=int(_field(config, "num_hidden_layers", where)),
        hidden_size=hidden,
        vocab_size=int(_field(config, "vocab_size", where)),
        num_q_heads=q_heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(_field(config, "intermediate_size", where)),
        attention="mla" if is_mla else "gqa",
        kv_lora_rank=int(config.get("kv_lora_rank") or 0),
        qk_rope_head_dim=int(config.get("qk_rope_head_dim") or 0) if is_mla else 0,
        qk_nope_head_dim=int(config.get("qk_nope_head_dim") or 0) if is_mla else 0,
        v_head_dim=int(config.get("v_head_dim") or 0) if is_mla else 0,
        q_lora_rank=int(config.get("q_lora_rank") or 0) if is_mla else 0,
        num_experts=experts,
        experts_per_token=int(config.get("num_experts_per_tok") or 0) if experts else 0,
        moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=shared_inter,
        first_dense_layers=first_dense,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        dtype=_config_dtype(config),
        kv_cache_dtype=_model_dtype(config),
        source=source,
        max_position_embeddings=position_limit(config),
    )


# rope types whose config already states the scaled length (vLLM 0.32 config/model.py _get_and_verify_max_len)
_PRESCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def position_limit(config: Mapping[str, Any]) -> int:
    """The longest context vLLM derives from a config: ``max_position_embeddings`` times the rope scaling
    factor, where vLLM 0.32 applies one (``linear``, ``dynamic``; not the YaRN/llama3/longrope family,
    whose configs state the scaled length, nor Gemma 3)."""
    limit = int(config.get("max_position_embeddings") or 0)
    rope = config.get("rope_scaling") or config.get("rope_parameters")
    if not limit or not isinstance(rope, Mapping) or "gemma3" in str(config.get("model_type", "")):
        return limit
    kind = rope.get("rope_type", rope.get("type", "default"))
    factor = rope.get("factor")
    if kind in _PRESCALED_ROPE or kind == "default" or not isinstance(factor, (int, float)) or factor <= 0:
        return limit
    return int(limit * factor)


def preset_names() -> list[str]:
    """Names of the model presets shipped under ``configs/models``."""
    return sorted(path.stem for path in MODEL_PRESET_DIR.glob("*.yaml"))


_PRESET_KEYS = ("name", "hf_id", "config")


def _load_preset_file(path: Path) -> ModelSpec:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PlannerError(f"model preset {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("config"), Mapping):
        raise PlannerError(f"model preset {str(path)!r} must have a 'config:' mapping of config.json fields")
    unknown = sorted(str(key) for key in data if key not in _PRESET_KEYS)
    if unknown:
        raise PlannerError(f"model preset {str(path)!r} has unknown key(s) {unknown}, which would be ignored; "
                           f"valid keys are {', '.join(_PRESET_KEYS)} (config.json fields go under 'config:')")
    return spec_from_hf_config(data["config"], name=str(data.get("name", path.stem)),
                               source=str(data.get("hf_id", path.stem)))


def _load_config_json(path: Path) -> ModelSpec:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PlannerError(f"{str(path)!r} is not valid JSON: {err}") from None
    model_dir = path.parent
    return spec_from_hf_config(config, name=model_dir.name or path.stem, source=str(model_dir))


def load_model(ref: str) -> ModelSpec:
    """Resolve ``--model``: a preset name, a preset YAML, a ``config.json`` or a model directory."""
    path = Path(ref).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise PlannerError(f"model directory {ref!r} has no config.json")
    if path.is_file():
        return _load_preset_file(path) if path.suffix in (".yaml", ".yml") else _load_config_json(path)
    preset = MODEL_PRESET_DIR / f"{ref}.yaml"
    if preset.is_file():
        return _load_preset_file(preset)
    raise PlannerError(
        f"model {ref!r} not found: not a file or directory, and not a preset; known presets: "
        f"{', '.join(preset_names())} (or pass a Hugging Face config.json / model directory)"
    )


def context_warning(model: ModelSpec, context: int) -> str | None:
    """Why vLLM would refuse ``context`` for this model, or ``None``.

    vLLM caps ``--max-model-len`` at the config's ``max_position_embeddings``
    (after rope scaling) and refuses more unless ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1``.
    The plan is still priced: the paper prices Llama-405B at 1M tokens, past its 128K.
    """
    limit = model.max_position_embeddings
    if not limit or context <= limit:
        return None
    return (f"context {context:,} exceeds {model.name}'s max_position_embeddings {limit:,}: vLLM refuses "
            f"--max-model-len {context} unless the model's rope scaling allows it or "
            f"VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 is set (at the model's own risk); priced anyway")


def kv_bytes_per_request(model: ModelSpec, context: int, kv_bytes: float) -> float:
    """Bytes of KV cache one request of ``context`` tokens holds across all layers, unsharded."""
    return model.num_layers * context * model.kv_elements_per_token * kv_bytes
