"""What differs between the model families the converter supports: one table, looked up by HF ``model_type``."""
from __future__ import annotations

import functools

from dataclasses import dataclass

import gguf
import numpy as np

# The method's processing order inside a decoder block (q, v, o, k, gate, up, down).
LLAMA_STYLE_LINEARS = (
    "self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.k_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


@dataclass(frozen=True)
class SharedInputUnit:
    """Linears that read the same input, factorised as one matrix of their stacked rows: one V (and s_pre, s_mid)
    for all, one block of U rows and s_post per member. llama.cpp multiplies such a layer as its fused tensor (one
    matmul, then views), which every supported family's graph has (build_qkv), so no loader change is needed."""
    name: str                 # the unit's name inside a block, in Hugging Face style
    members: tuple[str, ...]  # in llama.cpp's row order of the fused tensor
    gguf_tensor: gguf.MODEL_TENSOR


# --shared-v choices; "none" keeps every linear its own factors
SHARED_INPUT_UNITS = {
    "qkv": SharedInputUnit("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                           gguf.MODEL_TENSOR.ATTN_QKV),
}
SHARED_NONE = "none"


@dataclass(frozen=True)
class Architecture:
    gguf_arch: gguf.MODEL_ARCH
    linears: tuple[str, ...] = LLAMA_STYLE_LINEARS
    shrinkage: float = 0.2          # Ledoit-Wolf shrinkage of the Hessian diagonals (paper: 0.2 Llama/Qwen, 0.6 Gemma)
    rope_permuted_rows: bool = False  # llama.cpp's converter interleaves q/k output rows for RoPE (LlamaModel.permute)
    sensitivity_linear: str = "mlp.down_proj"  # its output-gradient statistics weight the block loss
    norm_offset: float = 0.0        # llama.cpp stores RMSNorm weights plus this (Gemma's norms scale by 1 + w)

    @property
    def gguf_arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def units(self, shared_v: str = SHARED_NONE) -> tuple[str, ...]:
        """The factorised layers of a block in the method's order: each linear, or a shared-input unit in the place
        of its first member."""
        if shared_v == SHARED_NONE:
            return self.linears
        unit = SHARED_INPUT_UNITS[shared_v]
        return tuple(unit.name if linear == unit.members[0] else linear
                     for linear in self.linears if linear == unit.members[0] or linear not in unit.members)


def unit_members(unit: str) -> tuple[str, ...]:
    """The linears a factorised layer ('self_attn.q_proj' or a shared-input unit's name) stands for."""
    shared = _SHARED_BY_NAME.get(unit)
    return (unit,) if shared is None else shared.members


_SHARED_BY_NAME = {u.name: u for u in SHARED_INPUT_UNITS.values()}


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, rope_permuted_rows=True),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2),
    "qwen3": Architecture(gguf.MODEL_ARCH.QWEN3),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, rope_permuted_rows=True),
    "gemma3_text": Architecture(gguf.MODEL_ARCH.GEMMA3, shrinkage=0.6, norm_offset=1.0),
}

# general.architecture of a GGUF -> the Hugging Face model_type transformers builds from it
GGUF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}


class UnsupportedArchitecture(ValueError):
    pass


def architecture_for(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"model_type '{model_type}' is not supported (supported: {supported})") from None


def llama_cpp_query_pre_attn_scalar(model_type: str, config: dict) -> int | None:
    """The query_pre_attn_scalar llama.cpp's Gemma 3 graph uses, which no GGUF key carries: hidden / heads for its
    62-block (27B) model, the head dimension for every other; None for the families without one."""
    if model_type != "gemma3_text":
        return None
    if config.get("num_hidden_layers") == 62:
        return config["hidden_size"] // config["num_attention_heads"]  # integral in every released config
    return int(config.get("head_dim") or 256)  # Gemma3TextConfig's default head_dim


def check_llama_cpp_agrees(model_type: str, config: dict) -> None:
    """Refuse a model whose config says what llama.cpp's graph of its family would compute differently."""
    expected = llama_cpp_query_pre_attn_scalar(model_type, config)
    actual = config.get("query_pre_attn_scalar", 256)  # Gemma3TextConfig's default
    if expected is not None and actual != expected:
        raise UnsupportedArchitecture(
            f"query_pre_attn_scalar {actual}: llama.cpp scales a {model_type} model's queries by "
            f"1/sqrt({expected}) whatever the config says, so the converted file would not compute this model")


def rope_row_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Index array p with gguf_rows = hf_rows[p], as llama.cpp's LlamaModel.permute reorders q/k output rows."""
    head_dim = n_rows // n_head
    idx = np.arange(n_rows).reshape(n_head, 2, head_dim // 2)
    return idx.swapaxes(1, 2).reshape(n_rows)


def gguf_row_permutation(arch: Architecture, linear: str, n_rows: int, config) -> np.ndarray | None:
    """Row order llama.cpp uses for this linear's output, or None when it keeps Hugging Face's."""
    if not arch.rope_permuted_rows:
        return None
    if linear == "self_attn.q_proj":
        return rope_row_permutation(n_rows, config.num_attention_heads)
    if linear == "self_attn.k_proj":
        return rope_row_permutation(n_rows, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return None


@functools.lru_cache(maxsize=8)
def _tensor_name_map(gguf_arch, n_layers: int):
    return gguf.get_tensor_name_map(gguf_arch, n_layers)  # builds every name of the model: 40 ms a call


def gguf_base_name(arch: Architecture, n_layers: int, hf_name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'blk.3.attn_q' through gguf-py's tensor name map; a shared-input unit
    ('model.layers.3.self_attn.qkv_proj') -> its fused tensor ('blk.3.attn_qkv')."""
    block, _, unit = hf_name.partition(".layers.")[2].partition(".")
    if unit in _SHARED_BY_NAME:
        return gguf.TENSOR_NAMES[_SHARED_BY_NAME[unit].gguf_tensor].format(bid=int(block))
    name = _tensor_name_map(arch.gguf_arch, n_layers).get_name(hf_name)
    if name is None:
        raise KeyError(f"no GGUF name for {hf_name} in architecture {arch.gguf_arch_name}")
    return name
