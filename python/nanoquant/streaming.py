"""Decoder-block weights that come and go, so a model bigger than RAM converts one block at a time.

A Hugging Face folder is opened as a skeleton: embeddings, final norm, head and buffers are real, every decoder
block's parameters stay on the meta device until `load` reads them from the safetensors files (F32 in memory) and
`release` drops them again. A GGUF input is dequantised whole by transformers and is resident (its loads are no-ops).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


class ResidentBlocks:
    """Every block is in memory already."""
    streamed = False

    def load(self, model, index: int) -> None:
        pass

    def release(self, model, index: int) -> None:
        pass


class SafetensorsBlocks:
    """Blocks read from a HF folder's safetensors shards on demand."""
    streamed = True

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
        self.handles = {name: safe_open(folder / name, "pt") for name in files}
        self.where = {key: name for name, h in self.handles.items() for key in h.keys()}

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with prefix, in F32, keyed by the rest of its name."""
        return {key[len(prefix):]: self.handles[file].get_tensor(key).float()
                for key, file in self.where.items() if key.startswith(prefix)}

    def load(self, model, index: int) -> None:
        prefix = f"model.layers.{index}."
        state = self.tensors(prefix)
        if not state:
            raise KeyError(f"no tensors named {prefix}* in the safetensors files")
        model.model.layers[index].load_state_dict(state, strict=True, assign=True)

    def release(self, model, index: int) -> None:
        model.model.layers[index].to("meta")


def open_skeleton(folder: Path):
    """(model, SafetensorsBlocks): the model with only its non-block weights loaded, in F32."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    blocks = SafetensorsBlocks(folder)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    outside = {k: v for k, v in blocks.tensors("").items() if not k.startswith("model.layers.")}
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
