"""The model to convert: a Hugging Face folder or a GGUF file, its tokenizer, the blocks streamed from it, the
base GGUF whose metadata and small tensors the output keeps, and the GGUF that answers calibration instructions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch

from nanoquant.convert.architectures import (Architecture, GGUF_MODEL_TYPES, UnsupportedArchitecture,
                                             check_llama_cpp_agrees)
from nanoquant.convert.streaming import GGUFBlocks, SafetensorsBlocks, open_gguf_skeleton, open_skeleton, place_skeleton

# llama.cpp's Hugging Face converter (convert_hf_to_gguf.py and its `conversion` package): the patched tree named by
# this variable, else the copy the wheel carries (pyproject's wheel.force-include); a checkout's command line sets
# the variable to its own vendor/llama.cpp
LLAMA_CPP_ENV = "NANOQUANT_LLAMA_CPP"
PACKAGED_LLAMA_CPP = Path(__file__).resolve().parents[1] / "_llama_cpp"


class ConversionError(RuntimeError):
    pass


@dataclass
class Source:
    model: torch.nn.Module
    tokenizer: object
    config: object
    arch: Architecture
    base_gguf: Path
    path: Path
    blocks: SafetensorsBlocks | GGUFBlocks


def model_type(model_path: Path) -> str:
    if model_path.is_dir():
        config_path = model_path / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{model_path}: not a Hugging Face model folder (no config.json)")
        config = json.loads(config_path.read_text())
        model_type = config.get("model_type")
        if model_type is None:
            raise ConversionError(f"{config_path}: has no model_type")
        try:
            check_llama_cpp_agrees(model_type, config)
        except UnsupportedArchitecture as e:
            raise ConversionError(f"{config_path}: {e}") from None
        return model_type
    if model_path.is_file():
        try:
            reader = gguf.GGUFReader(model_path)
            gguf_arch = reader.fields["general.architecture"].contents()
        except Exception as e:
            raise ConversionError(f"{model_path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        return GGUF_MODEL_TYPES.get(gguf_arch, gguf_arch)
    raise ConversionError(f"{model_path}: no such file or folder")


def _base_gguf_from_hf(model_path: Path, work_dir: Path) -> Path:
    """llama.cpp's own converter gives the metadata, tokenizer, embeddings and norms exactly as llama.cpp wants them."""
    explicit = os.environ.get(LLAMA_CPP_ENV)
    script = (Path(explicit) if explicit else PACKAGED_LLAMA_CPP) / "convert_hf_to_gguf.py"
    if not script.is_file():
        where = f"{LLAMA_CPP_ENV}={explicit}" if explicit else "this installation of nanoquant"
        raise ConversionError(f"{script} not found ({where}): a Hugging Face folder needs llama.cpp's converter; set "
                              f"{LLAMA_CPP_ENV} to a patched llama.cpp tree (a checkout's vendor/llama.cpp after "
                              "`make setup`), or convert from a GGUF file")
    out = work_dir / "base-f32.gguf"
    cmd = [sys.executable, str(script), str(model_path), "--outtype", "f32", "--outfile", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConversionError(f"{model_path}: llama.cpp's convert_hf_to_gguf.py failed:\n{proc.stderr[-3000:]}")
    return out


def load_source(model_path: Path, work_dir: Path, arch: Architecture, device: torch.device) -> Source:
    """Blocks stream from a HF folder's safetensors or from a GGUF (dequantised one block at a time; the GGUF's
    dequantisation is the teacher, its metadata and small tensors the base file); the model computes on `device`."""
    from transformers import AutoTokenizer

    if model_path.is_dir():
        model, blocks = open_skeleton(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        base = _base_gguf_from_hf(model_path, work_dir)
    else:
        model, blocks = open_gguf_skeleton(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
        base = model_path
    place_skeleton(model, blocks, device)
    return Source(model, tokenizer, model.config, arch, base, model_path, blocks)


def answering_teacher(source: Source) -> Path:
    """The GGUF that writes the calibration answers: a GGUF source itself; for a Hugging Face folder a Q8_0 copy of
    the F32 base file, as an F32 7B model (28 GB) would not fit in memory beside the converter."""
    if source.base_gguf == source.path:
        return source.path
    out = source.base_gguf.with_name("teacher-q8_0.gguf")
    if not out.is_file():
        from nanoquant import _core  # libllama's own quantizer: what llama-quantize runs

        partial = out.with_name(out.name + ".partial")
        try:
            _core.quantize_file(str(source.base_gguf), str(partial), "Q8_0", torch.get_num_threads())
        except RuntimeError as e:
            raise ConversionError(f"{source.path}: the answering teacher (Q8_0) could not be made: {e}") from e
        partial.replace(out)
    return out
