"""NanoQuant for llama.cpp: sub-1-bit low-rank binary quantization of LLMs, as GGUF files llama.cpp runs."""
from nanoquant.fileformat import nq1
from nanoquant.fileformat.nq1 import pack_signs, rank_for_bpw, unpack_signs
from nanoquant.runtime.model import ContextOverflowError, Model, ModelLoadError

__all__ = ["Model", "ModelLoadError", "ContextOverflowError", "nq1", "pack_signs", "unpack_signs", "rank_for_bpw"]
__version__ = "0.1.0"
