"""Offline "twin" models that stock vLLM loads (`vllm-helix make-tiny-model` writes one).

Helix has to be tested against real vLLM model code (DeepSeek-V3's MLA + MoE,
Llama's GQA), but this project must never fetch anything from a hub. A twin is a
complete Hugging Face model directory built entirely in-process: the real
architecture class from ``transformers`` with tiny dimensions and random weights,
plus a byte-level BPE tokenizer trained here on text generated here.

Dimensions are not arbitrary: vLLM's CPU MLA backend only accepts the real
DeepSeek latent size (``kv_lora_rank`` 512 + ``qk_rope_head_dim`` 64 = 576), and
the GQA twin has fewer KV heads than a plausible TP width so KV-head replication
paths get exercised. Everything is seeded, so the same arguments give the same
bytes, and tests can share a twin by path instead of by download.

``transformers`` and ``tokenizers`` (``pip install vllm-helix[twins]``; vLLM
installs them too) are imported inside functions so that ``vllm-helix --help``
stays instant and a core-only install imports.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

ARCHS = ("deepseek_v3", "llama")
DTYPES = ("float32", "bfloat16")

VOCAB_SIZE = 2048
MAX_POSITIONS = 32768  # room for the 16K-token serving benchmarks
HIDDEN_SIZE = 256

# Special tokens take the first ids, in this order; the configs refer to them by id.
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>")
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

# One turn per message, closed by EOS so a chat reply stops where a turn would end.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)

# Logit scale of the output head: logits with std ~3 give a peaked next-token
# distribution (top-1 probability ~0.25), so greedy decoding has clear winners
# instead of near-ties that flip on rounding noise.
LM_HEAD_GAIN = 3.0
# Real DeepSeek-V3 checkpoints carry a non-zero routing bias; a small random one
# makes noaux_tc routing depend on it as it does there.
ROUTER_BIAS_STD = 0.1

# Tokenizer training text: the words are generated from syllables so the text has
# the repeated sub-word structure BPE needs, with numbers and punctuation mixed in.
_SYLLABLES = ("ka", "lo", "mi", "ren", "tas", "vo", "pel", "qui", "zan", "dor", "ith", "su",
              "gra", "ne", "hul", "bri", "ox", "fen", "ty", "wa", "sha", "cle", "mon", "ep")
_ENGLISH = ("the", "a", "of", "and", "to", "in", "is", "that", "it", "for", "on", "with",
            "model", "token", "cache", "attention", "expert", "layer", "head", "parallel",
            "Helix", "vLLM", "decode", "prefill", "batch", "rank", "shard", "tensor")
_PUNCTUATION = (".", ",", "?", "!", ";", ":")
_CORPUS_SEED = 1234
_CORPUS_SENTENCES = 20000


class TwinError(ValueError):
    """The requested twin cannot be built; the message says which argument to change."""


def make_tiny_model(
    out_dir: str | Path,
    arch: str,
    dtype: str = "float32",
    layers: int = 2,
    seed: int = 0,
    kv_heads: int = 2,
) -> Path:
    """Write a complete model directory (config, safetensors, tokenizer, generation config).

    Args:
        out_dir: directory to write (created; existing files with the same names are replaced).
        arch: ``deepseek_v3`` (MLA + MoE with a shared expert, dense first layer) or
            ``llama`` (GQA).
        dtype: storage dtype of the weights, ``float32`` or ``bfloat16``.
        layers: decoder layers; DeepSeek-V3 needs at least 2 (the first is dense).
        seed: weight seed. The tokenizer does not depend on it, so twins of
            different seeds share token ids.
        kv_heads: llama only: KV heads shared by the 8 query heads (1, 2, 4 or 8).
            Helix on N ranks keeps one KV head per TPA slice, so kvp=2 on 2 ranks
            needs ``kv_heads=1``; the default 2 is fewer KV heads than TP=4.

    Returns:
        The output directory as a :class:`Path`.

    Raises:
        TwinError: unknown ``arch``/``dtype`` or too few ``layers``.
    """
    _validate(arch, dtype, layers, kv_heads)
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = twin_config(arch, layers, kv_heads)
    model = _build_model(config, seed)
    _cast(model, getattr(torch, dtype))
    model.config.dtype = dtype
    model.generation_config = _generation_config()
    model.save_pretrained(out)
    _train_tokenizer().save_pretrained(out)
    return out


# The twins the benchmarks compare: the DeepSeek-V3 twin (MLA) and the Llama twin with one KV head.
BENCHMARK_TWINS = {"deepseek_v3": {"arch": "deepseek_v3"}, "llama_kv1": {"arch": "llama", "kv_heads": 1}}


def benchmark_twin(name: str, root: str | Path = ".cache/twins", layers: int = 2) -> Path:
    """``root/name``, one of :data:`BENCHMARK_TWINS`, built on first use and reused after.

    ``layers`` other than the default 2 gives a deeper twin at ``root/name-<layers>l``
    (the hardware calibration times two depths to separate per-layer from per-step costs).
    """
    path = Path(root) / (name if layers == 2 else f"{name}-{layers}l")
    if not (path / "config.json").exists():
        make_tiny_model(path, layers=layers, **BENCHMARK_TWINS[name])
    return path


def _validate(arch: str, dtype: str, layers: int, kv_heads: int = 2) -> None:
    if arch not in ARCHS:
        raise TwinError(f"arch {arch!r} not supported; choose deepseek_v3 or llama")
    if dtype not in DTYPES:
        raise TwinError(f"dtype {dtype!r} not supported; choose float32 or bfloat16")
    if layers < 1:
        raise TwinError(f"layers must be >= 1, got {layers}")
    if kv_heads not in (1, 2, 4, 8):
        raise TwinError(f"kv_heads={kv_heads} must divide the 8 query heads: use 1, 2, 4 or 8")
    if arch != "llama" and kv_heads != 2:
        raise TwinError("--kv-heads applies to the llama twin only (MLA has one latent KV head)")
    if arch == "deepseek_v3" and layers < 2:
        raise TwinError(
            f"deepseek_v3 needs layers >= 2 (got {layers}): layer 0 is dense "
            "(first_k_dense_replace=1), so only layers 1.. are MoE layers"
        )


def twin_config(arch: str, layers: int = 2, kv_heads: int = 2) -> PretrainedConfig:
    """The Hugging Face config :func:`make_tiny_model` writes, without building weights (the planner's
    presets of the twins are checked against it)."""
    return _deepseek_v3_config(layers) if arch == "deepseek_v3" else _llama_config(layers, kv_heads)


def _deepseek_v3_config(layers: int) -> PretrainedConfig:
    """DeepSeek-V3 in miniature: the real MLA latent sizes, everything else tiny."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        # MLA: vLLM's CPU MLA kernels only exist for 512 + 64 (the real sizes).
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        q_lora_rank=128,
        qk_nope_head_dim=64,
        v_head_dim=64,
        # MoE: 8 routed experts in 4 groups of 2; 2 groups then 2 experts per token.
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        # vLLM's DeepSeek loader expects e_score_correction_bias (noaux_tc routing).
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        # No multi-token-prediction layer: the twin is a plain decoder.
        num_nextn_predict_layers=0,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def _llama_config(layers: int, kv_heads: int = 2) -> PretrainedConfig:
    """Llama with GQA: 8 query heads share ``kv_heads`` KV heads (default 2: fewer than TP=4)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=kv_heads,
        # 64 is in vLLM CPU_ATTN's supported head sizes (and a real Llama size).
        head_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )



def _build_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """Instantiate the architecture and overwrite every weight from ``seed``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    _init_weights(model, seed)
    return model.eval()


def _init_weights(model: PreTrainedModel, seed: int) -> None:
    """Unit-scale initialisation, in a fixed name order, from one generator.

    transformers' default (std 0.02 everywhere) leaves the residual stream
    dominated by nothing in particular and the logits nearly flat. Here
    embeddings are N(0, 1), every projection N(0, 1/fan_in) so each sublayer's
    output has unit scale, norms are 1, and the output head is scaled by
    ``LM_HEAD_GAIN``. Going through the state dict by sorted name (rather than
    module construction order) keeps the bytes independent of how transformers
    builds or initialises modules.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            tensor.copy_(_initial_value(name, tensor, generator))


def _initial_value(name: str, tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    import torch

    if "norm" in name:
        return torch.ones_like(tensor)
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
    if name.endswith("e_score_correction_bias"):
        return noise * ROUTER_BIAS_STD
    if "embed_tokens" in name:
        return noise
    gain = LM_HEAD_GAIN if name.startswith("lm_head") else 1.0
    return noise * (gain / tensor.shape[-1] ** 0.5)


def _cast(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Cast weights to ``dtype`` in place, except those transformers pins to float32.

    Real DeepSeek-V3 checkpoints store ``e_score_correction_bias`` in float32
    even when everything else is low precision; the bf16 twin does the same.
    (``from_config(dtype=...)`` would cast it too.)
    """
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    for module_name, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                full_name = f"{module_name}.{name}"
                if tensor is not None and tensor.is_floating_point() and not any(k in full_name for k in keep_fp32):
                    tensor.data = tensor.data.to(dtype)


def _generation_config() -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def _corpus() -> list[str]:
    """Deterministic pseudo-text: invented words, some English, numbers, punctuation."""
    rng = random.Random(_CORPUS_SEED)
    invented = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(3000)]

    def word() -> str:
        roll = rng.random()
        if roll < 0.35:
            return rng.choice(_ENGLISH)
        if roll < 0.45:
            return str(rng.randint(0, 9999))
        token = rng.choice(invented)
        return token.capitalize() if rng.random() < 0.1 else token

    return [
        " ".join(word() for _ in range(rng.randint(4, 16))) + rng.choice(_PUNCTUATION)
        for _ in range(_CORPUS_SENTENCES)
    ]


@functools.lru_cache(maxsize=1)
def _train_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on :func:`_corpus`; BOS is prepended on encode.

    Cached: the corpus is fixed, so every twin built in a process shares one
    tokenizer (``save_pretrained`` does not modify it).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    bos, eos, pad = SPECIAL_TOKENS[BOS_ID], SPECIAL_TOKENS[EOS_ID], SPECIAL_TOKENS[PAD_ID]
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
