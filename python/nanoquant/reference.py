"""Python reference forward of a NanoQuant GGUF: a transformers model whose NanoQuant layers are torch modules.

It loads the file with gguf-py (no llama.cpp code), so comparing its perplexity with llama-perplexity checks the
whole C++ path: packing, the NQ1 kernels, the loader hook and the graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, GGMLQuantizationType

from nanoquant.fileformat import nq1
from nanoquant.convert.admm import lowrank_binary_product
from nanoquant.convert.architectures import (SHARED_INPUT_UNITS, UnsupportedArchitecture, gguf_base_name,
                                             gguf_row_permutation)
from nanoquant.fileformat.info import NQFormatError, check_format_version, check_scales, open_gguf  # noqa: F401  (re-exported: callers import them from here too)
from nanoquant.convert.streaming import GGUFTensors, gguf_config, tensor_as_float
from nanoquant.convert.units import HEAD, install_unit, member_names, unit_rows, unit_shape


class LowRankBinaryLinear(torch.nn.Module):
    """y = s_post * (U (s_mid * (V (s_pre * x)))) + bias, with U and V held as +-1 float matrices."""

    def __init__(self, u, v, s_pre=None, s_mid=None, s_post=None, bias=None):
        super().__init__()
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        for name, t in (("s_pre", s_pre), ("s_mid", s_mid), ("s_post", s_post), ("bias", bias)):
            self.register_buffer(name, t)
        self.in_features, self.out_features = v.shape[1], u.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_binary_product(x, self.u, self.v, self.s_pre, self.s_mid, self.s_post, self.bias)


@dataclass
class NQTensors:
    """The NanoQuant tensors of one layer, as numpy arrays in file order."""
    v: np.ndarray
    u: np.ndarray
    s_pre: np.ndarray | None
    s_mid: np.ndarray | None
    s_post: np.ndarray | None


def nq_layers(reader: GGUFReader, path: Path) -> dict[str, NQTensors]:
    """Base name -> validated NanoQuant tensors of every low-rank binary layer in the file."""
    check_format_version(reader, path)
    by_name = {t.name: t for t in reader.tensors}
    layers: dict[str, NQTensors] = {}
    for name, t in by_name.items():
        if not name.endswith("." + nq1.SUFFIX_V):
            continue
        base = name[: -len(nq1.SUFFIX_V) - 1]
        u_t = by_name.get(f"{base}.{nq1.SUFFIX_U}")
        if u_t is None:
            raise NQFormatError(f"{path}: {name} has no matching {base}.{nq1.SUFFIX_U}")
        for tensor in (t, u_t):
            if tensor.tensor_type != GGMLQuantizationType.NQ1:
                raise NQFormatError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, expected NQ1")
        d_in, rank = (int(x) for x in t.shape[:2])
        u_rank, d_out = (int(x) for x in u_t.shape[:2])
        if u_rank != rank:
            raise NQFormatError(f"{path}: tensor {u_t.name} has rank {u_rank} but {name} has rank {rank}")
        check_scales(path, base, by_name)
        scales = {}
        for suffix, size in ((nq1.SUFFIX_S_PRE, d_in), (nq1.SUFFIX_S_MID, rank), (nq1.SUFFIX_S_POST, d_out)):
            s = by_name.get(f"{base}.{suffix}")
            if s is not None and (s.tensor_type != GGMLQuantizationType.F32 or int(s.n_elements) != size):
                raise NQFormatError(f"{path}: tensor {s.name} must be F32 with {size} values, got "
                                    f"{s.tensor_type.name} with {int(s.n_elements)}")
            scales[suffix] = None if s is None else np.array(s.data, dtype=np.float32).reshape(size)
        layers[base] = NQTensors(
            v=nq1.unpack_signs(np.asarray(t.data).reshape(rank, d_in // 8), d_in),
            u=nq1.unpack_signs(np.asarray(u_t.data).reshape(d_out, rank // 8), rank),
            s_pre=scales[nq1.SUFFIX_S_PRE], s_mid=scales[nq1.SUFFIX_S_MID], s_post=scales[nq1.SUFFIX_S_POST])
    return layers


def load_reference_model(path: Path):
    """(model, tokenizer, architecture) for an NQ GGUF, NanoQuant layers as LowRankBinaryLinear."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    reader = open_gguf(path)
    layers = nq_layers(reader, path)
    try:
        config, arch = gguf_config(path, reader)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except UnsupportedArchitecture:
        raise
    except Exception as e:
        raise NQFormatError(f"{path}: transformers could not read its metadata ({type(e).__name__}: {e})") from e
    tensors = GGUFTensors(path, arch, config, reader)
    by_name = tensors.by_name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    used: set[str] = set()
    units = (*arch.linears, *(unit.name for unit in SHARED_INPUT_UNITS.values()))
    for i in range(config.num_hidden_layers):
        for unit in units:
            hf_name = f"model.layers.{i}.{unit}"
            base = gguf_base_name(arch, config.num_hidden_layers, hf_name)
            nq = layers.get(base)
            if nq is None:
                continue
            expected = unit_shape(model, hf_name)
            if (nq.u.shape[0], nq.v.shape[1]) != expected:
                raise NQFormatError(f"{path}: {base} is {nq.u.shape[0]}x{nq.v.shape[1]}, the model expects "
                                    f"{expected[0]}x{expected[1]}")
            # back to Hugging Face's row order, member by member (the file holds each as llama.cpp permutes it)
            bounds = np.cumsum([0, *unit_rows(model, hf_name)])
            members = member_names(hf_name)
            file_rows = []
            for member, start, stop in zip(members, bounds[:-1], bounds[1:]):
                perm = gguf_row_permutation(arch, member.split(".", 3)[-1], int(stop - start), config)
                file_rows.append(np.arange(start, stop) if perm is None else start + perm)
            inv = np.argsort(np.concatenate(file_rows))
            u, s_post = nq.u[inv], None if nq.s_post is None else nq.s_post[inv]
            bias_names = [f"{gguf_base_name(arch, config.num_hidden_layers, m)}.bias" for m in members]
            found = [by_name.get(b) for b in bias_names]
            if any(b is None for b in found) and any(b is not None for b in found):
                raise NQFormatError(f"{path}: {base} has biases for some of {', '.join(bias_names)} but not all")
            bias = None if found[0] is None else np.concatenate([tensor_as_float(b).reshape(-1) for b in found])[inv]
            module = LowRankBinaryLinear(
                torch.from_numpy(np.ascontiguousarray(u)), torch.from_numpy(nq.v),
                *(None if s is None else torch.from_numpy(np.ascontiguousarray(s)) for s in (nq.s_pre, nq.s_mid, s_post)),
                bias=None if bias is None else torch.from_numpy(np.ascontiguousarray(bias)))
            install_unit(model, hf_name, module)
            used.update([f"{base}.{s}" for s in nq1.SUFFIXES] + bias_names)

    head = layers.get(gguf_base_name(arch, config.num_hidden_layers, HEAD))
    if head is not None:  # --nq-head: the output head is a NanoQuant layer too
        if config.tie_word_embeddings:
            raise NQFormatError(f"{path}: the output head is a NanoQuant layer, but the model ties it to the token "
                                "embedding")
        expected = unit_shape(model, HEAD)
        if (head.u.shape[0], head.v.shape[1]) != expected:
            raise NQFormatError(f"{path}: the NanoQuant output head is {head.u.shape[0]}x{head.v.shape[1]}, the "
                                f"model expects {expected[0]}x{expected[1]}")
        install_unit(model, HEAD, LowRankBinaryLinear(
            torch.from_numpy(head.u), torch.from_numpy(head.v),
            *(None if s is None else torch.from_numpy(s) for s in (head.s_pre, head.s_mid, head.s_post))))
        used.update(f"{gguf_base_name(arch, config.num_hidden_layers, HEAD)}.{s}" for s in nq1.SUFFIXES)
    state = {hf_name: tensors.get(hf_name, param.shape) for hf_name, param in model.named_parameters()
             if not (config.tie_word_embeddings and hf_name == "lm_head.weight")}
    unused = sorted(set(by_name) - used - tensors.used - {"rope_freqs.weight"})
    if unused:
        raise NQFormatError(f"{path}: tensors not used by a {arch.gguf_arch_name} model: {', '.join(unused[:5])}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model, tokenizer, arch


def perplexity_tokens(tokenizer, text: str, add_bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if add_bos else []) + ids


@torch.no_grad()
def perplexity(model, tokens: list[int], n_ctx: int = 512, n_chunks: int | None = None,
               bos_id: int | None = None) -> float:
    """llama-perplexity's protocol: chunks of n_ctx tokens, the second half of each scored, BOS as first token."""
    n_available = len(tokens) // n_ctx
    n = n_available if n_chunks is None else min(n_chunks, n_available)
    if n == 0:
        raise ValueError(f"need at least {n_ctx} tokens, got {len(tokens)}")
    first = n_ctx // 2
    nll, count = 0.0, 0
    for c in range(n):
        chunk = torch.tensor(tokens[c * n_ctx:(c + 1) * n_ctx])
        inputs = chunk.clone()
        if bos_id is not None:
            inputs[0] = bos_id
        logits = model(input_ids=inputs[None], use_cache=False).logits[0].double()
        logprobs = torch.log_softmax(logits[first:n_ctx - 1], dim=-1)
        targets = chunk[first + 1:n_ctx]
        nll -= float(logprobs.gather(1, targets[:, None]).sum())
        count += targets.numel()
    return math.exp(nll / count)


def gguf_add_bos(reader: GGUFReader) -> bool:
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else False


def dense_weight(layer: NQTensors) -> np.ndarray:
    """s_post * U diag(s_mid) V * s_pre as one F32 matrix [d_out, d_in]: what the layer's factors multiply by."""
    u = layer.u.astype(np.float64) * (1.0 if layer.s_mid is None else layer.s_mid.astype(np.float64))
    w = u @ layer.v.astype(np.float64)
    if layer.s_pre is not None:
        w *= layer.s_pre.astype(np.float64)[None, :]
    if layer.s_post is not None:
        w *= layer.s_post.astype(np.float64)[:, None]
    return w.astype(np.float32)


def densify_gguf(src: Path, dst: Path) -> Path:
    """dst: src with every NanoQuant layer stored as its dense F32 `.weight`, an ordinary GGUF that stock llama.cpp
    multiplies with its own kernels: the F32 product of the factors, to hold the NQ1 paths against."""
    from nanoquant.fileformat.writer import rewrite_gguf

    layers = nq_layers(open_gguf(src), src)

    def edit(tensors):
        tensors[:] = [t for t in tensors if t[0].rsplit(".", 1)[-1] not in nq1.SUFFIXES]
        tensors.extend([f"{base}.weight", dense_weight(layer), GGMLQuantizationType.F32]
                       for base, layer in layers.items())
    return rewrite_gguf(src, dst, edit)
