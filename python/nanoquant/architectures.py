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
    """'model.layers.3.self_attn.q_proj' -> 'blk.3.attn_q' through gguf-py's tensor name map."""
    name = _tensor_name_map(arch.gguf_arch, n_layers).get_name(hf_name)
    if name is None:
        raise KeyError(f"no GGUF name for {hf_name} in architecture {arch.gguf_arch_name}")
    return name
