"""Decoder-block weights that come and go, so a model bigger than RAM converts one block at a time.

A model is opened as a skeleton: embeddings, final norm, head and buffers are real, every decoder block's parameters
stay on the meta device until `load` reads them (F32 in memory) and `release` drops them again. A Hugging Face folder
reads them from its safetensors files; a GGUF dequantises them with gguf-py, mapping llama.cpp's names, row order
and norm convention back to Hugging Face's (the inverse of what llama.cpp's converter does, and what transformers
does when it loads a GGUF whole).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from nanoquant.fileformat import nq1


class ResidentBlocks:
    """Every block is in memory already."""
    streamed = False

    def load(self, model, index: int) -> None:
        pass

    def release(self, model, index: int) -> None:
        pass


class StreamedBlocks:
    """Blocks whose weights are read on demand (F32 in host memory) and placed on `device`, where the conversion
    computes; released, they are shapes without data again."""
    streamed = True
    device = torch.device("cpu")

    def _place(self, model, index: int, state: dict[str, torch.Tensor]) -> None:
        layer = model.model.layers[index]
        layer.load_state_dict(state, strict=True, assign=True)
        layer.to(self.device)

    def release(self, model, index: int) -> None:
        model.model.layers[index].to("meta")


class SafetensorsBlocks(StreamedBlocks):
    """Blocks read from a HF folder's safetensors shards on demand."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{folder}: no *.safetensors files")
        self.folder = folder
        self.where = {}
        for name in files:
            with safe_open(folder / name, "pt") as handle:
                self.where.update((key, name) for key in handle.keys())

    def tensors(self, prefix: str, outside_blocks: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with prefix (and, with outside_blocks, that belongs to no decoder block),
        in F32, keyed by the rest of its name. Only those tensors are read."""
        from safetensors import safe_open

        keys = [key for key in self.where
                if key.startswith(prefix) and not (outside_blocks and key.startswith("model.layers."))]
        out = {}
        # a handle maps its whole file, and every page read stays resident while it is open: open one per call so
        # the pages of blocks already converted leave the RSS (7B in bf16: 400 MB a block)
        for file in sorted({self.where[key] for key in keys}):
            with safe_open(self.folder / file, "pt") as handle:
                out.update((key[len(prefix):], handle.get_tensor(key).float()) for key in keys
                           if self.where[key] == file)
        return out

    def load(self, model, index: int) -> None:
        prefix = f"model.layers.{index}."
        state = self.tensors(prefix)
        if not state:
            raise KeyError(f"no tensors named {prefix}* in the safetensors files")
        self._place(model, index, state)


class GGUFTensors:
    """A GGUF's tensors by Hugging Face parameter name, dequantised to F32 one at a time."""

    def __init__(self, path: Path, arch, config, reader=None):
        import gguf

        from nanoquant.fileformat.info import open_gguf

        self.path, self.arch, self.config = Path(path), arch, config
        self.by_name = {t.name: t for t in (reader or open_gguf(path)).tensors}
        self.names = gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
        self.used: set[str] = set()

    def gguf_name(self, hf_name: str) -> str | None:
        return self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def get(self, hf_name: str, shape) -> torch.Tensor:
        from nanoquant.convert.architectures import gguf_row_permutation
        from nanoquant.fileformat.info import NQFormatError

        name = self.gguf_name(hf_name)
        if name is None or name not in self.by_name:
            raise NQFormatError(f"{self.path}: no tensor for {hf_name} (looked for {name})")
        data = tensor_as_float(self.by_name[name])
        if tuple(data.shape) != tuple(shape):
            raise NQFormatError(f"{self.path}: tensor {name} has shape {data.shape}, expected {tuple(shape)}")
        if name.endswith("norm.weight") and self.arch.norm_offset:
            data = data - self.arch.norm_offset
        if hf_name.startswith("model.layers."):  # q/k rows back from llama.cpp's RoPE order
            linear = ".".join(hf_name.split(".")[3:-1])
            perm = gguf_row_permutation(self.arch, linear, data.shape[0], self.config)
            if perm is not None:
                data = data[np.argsort(perm)]
        self.used.add(name)
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))


def tensor_as_float(t) -> np.ndarray:
    """A gguf-py tensor dequantised to F32, in numpy's (rows, columns) order."""
    from gguf.quants import dequantize

    data = dequantize(np.asarray(t.data), t.tensor_type)
    return np.array(data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])


def gguf_config(path: Path, reader):
    """transformers' config of a GGUF, with what its GGUF mapping drops put back."""
    from transformers import AutoConfig

    from nanoquant.convert.architectures import architecture_for, llama_cpp_query_pre_attn_scalar

    path = Path(path)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    arch = architecture_for(config.model_type)
    key_length = reader.fields.get(f"{arch.gguf_arch_name}.attention.key_length")
    if key_length is not None:  # an explicit head_dim (qwen3's is not hidden / heads)
        config.head_dim = int(key_length.contents())
    names = {t.name for t in reader.tensors}  # an untied head is output.weight, or a NanoQuant layer (--nq-head)
    config.tie_word_embeddings = not ({"output.weight", f"output.{nq1.SUFFIX_V}"} & names)
    scalar = llama_cpp_query_pre_attn_scalar(config.model_type, config.to_dict())
    if scalar is not None:  # transformers' GGUF mapping leaves the config's default; llama.cpp's graph decides
        config.query_pre_attn_scalar = scalar
    return config, arch


class GGUFBlocks(StreamedBlocks):
    """Blocks dequantised from a GGUF on demand."""

    def __init__(self, tensors: GGUFTensors):
        self.tensors = tensors

    def load(self, model, index: int) -> None:
        layer = model.model.layers[index]
        self._place(model, index, {name: self.tensors.get(f"model.layers.{index}.{name}", p.shape)
                                   for name, p in layer.named_parameters()})


def _empty_model(config):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed for real
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def open_gguf_skeleton(path: Path):
    """(model, GGUFBlocks): a GGUF's model with only its non-block weights loaded, in F32."""
    from nanoquant.fileformat.info import open_gguf

    reader = open_gguf(path)
    config, arch = gguf_config(path, reader)
    tensors = GGUFTensors(path, arch, config, reader)
    model = _empty_model(config)
    tied = config.tie_word_embeddings
    outside = {name: tensors.get(name, p.shape) for name, p in model.named_parameters()
               if not name.startswith("model.layers.") and not (tied and name == "lm_head.weight")}
    model.load_state_dict(outside, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False), GGUFBlocks(tensors)


def open_skeleton(folder: Path):
    """(model, SafetensorsBlocks): the model with only its non-block weights loaded, in F32."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    blocks = SafetensorsBlocks(folder)
    model = _empty_model(config)
    outside = blocks.tensors("", outside_blocks=True)
    if "lm_head.weight" not in outside and getattr(config, "tie_word_embeddings", False):
        outside["lm_head.weight"] = outside["model.embed_tokens.weight"]
    expected = {name for name, _ in model.named_parameters() if not name.startswith("model.layers.")}
    missing = sorted(expected - set(outside))
    if missing:
        raise KeyError(f"{folder}: the safetensors files lack {', '.join(missing)}")
    model.load_state_dict(outside, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False), blocks


def place_skeleton(model, blocks: StreamedBlocks, device: torch.device) -> None:
    """Everything of the model outside its blocks (embeddings, final norm, head, rotary tables) moves to `device`,
    and the blocks will be placed there as they load. The blocks are shapes without data here, which cannot move."""
    blocks.device = device
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList()
    try:
        model.to(device)
    finally:
        model.model.layers = layers
