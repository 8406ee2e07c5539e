"""Write a NanoQuant GGUF: the base file's metadata and non-linear tensors plus the NQ tensors of each layer.

The file is written under a temporary name next to the target and renamed only once complete.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

from nanoquant.fileformat import nq1


@dataclass
class NQLayerTensors:
    """A factorised layer in llama.cpp's row order, ready to store."""
    base: str               # e.g. blk.3.attn_q, or blk.3.attn_qkv for a shared-input unit
    u: np.ndarray           # d_out x r signs (any signed dtype: negative is -1)
    v: np.ndarray           # r x d_in signs
    s_pre: np.ndarray | None
    s_post: np.ndarray | None
    s_mid: np.ndarray | None = None
    biases: dict[str, np.ndarray] = field(default_factory=dict)  # tuned biases, replacing the base file's by name
    replaces: tuple[str, ...] = ()  # the dense layers whose <name>.weight it takes the place of (default: base)

    def scales(self) -> list[tuple[str, np.ndarray]]:
        """(suffix, values) of the scales the layer has, in nq1.SCALE_SUFFIXES order."""
        values = (self.s_pre, self.s_mid, self.s_post)
        return [(suffix, s) for suffix, s in zip(nq1.SCALE_SUFFIXES, values) if s is not None]

    @property
    def replaced_weights(self) -> list[str]:
        return [f"{name}.weight" for name in (self.replaces or (self.base,))]


FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)  # written by numpy's own conversion
T = GGMLQuantizationType
# llama-quantize's fallback for a tensor whose rows its type's blocks do not divide (llama-quant.cpp
# tensor_type_fallback): a 256-block type becomes a 32-block type of about the same bits. Where that does not divide
# the rows either, the tensor stays F32
ROW_FALLBACK = {T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
                T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0,
                T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
TOKEN_EMBD, OUTPUT = "token_embd.weight", "output.weight"
IMATRIX_TYPES = (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS)  # ggml refuses to quantise these without one


def fitting_type(target: GGMLQuantizationType, cols: int) -> GGMLQuantizationType:
    """The type a tensor with rows of `cols` values is written in when `target` is asked for."""
    for candidate in (target, ROW_FALLBACK.get(target)):
        if candidate is not None and cols % gguf.GGML_QUANT_SIZES[candidate][0] == 0:
            return candidate
    return T.F32


# the output head's default: Q4_K, and Q8_0 where 256 does not divide the head's rows (llama-quantize's 1-2-bit mixes
# take Q5_K; on Qwen2.5-Coder-1.5B at 1.0 bpw Q4_K gave the same file quality, PPL 107.78 against 108.05 at 29 MB
# less, while Q2_K cost 6%: the sub-2-bit layers, not the head, set the error; bench/results/quality-Qwen2.5-Coder-*)
LOW_BIT_HEAD, NARROW_HEAD = T.Q4_K, T.Q8_0


@dataclass(frozen=True)
class TensorTypes:
    """The types of the tensors that are not NanoQuant layers, by role: the token embedding, the output head (a tied
    embedding is the head: llama.cpp gives it the head's type), and the rest. output None: llama-quantize's choice
    for the head of its 1-2-bit mixes (LOW_BIT_HEAD, or NARROW_HEAD for rows its blocks do not divide)."""
    other: GGMLQuantizationType
    token_embd: GGMLQuantizationType
    output: GGMLQuantizationType | None

    @classmethod
    def every(cls, t: GGMLQuantizationType) -> TensorTypes:
        return cls(other=t, token_embd=t, output=t)

    def for_tensor(self, name: str, tied: bool, cols: int) -> GGMLQuantizationType:
        if is_head(name, tied):
            if self.output is None:
                return LOW_BIT_HEAD if cols % gguf.GGML_QUANT_SIZES[LOW_BIT_HEAD][0] == 0 else NARROW_HEAD
            return self.output
        return self.token_embd if name == TOKEN_EMBD else self.other


def is_head(name: str, tied: bool) -> bool:
    return name == OUTPUT or (tied and name == TOKEN_EMBD)


def row_quantizer(target: GGMLQuantizationType) -> tuple[Callable[..., np.ndarray], str | None]:
    """(quantize, fallback note): quantize(float32 rows, imatrix=None) -> packed uint8 rows of `target`, by ggml's
    own quantizers (nanoquant._core, every type, an importance per column when given) or, where that native build
    cannot be imported (a GPU machine given only the source tree and gguf-py), by gguf-py's numpy quantizer of the
    type, whose bytes equal ggml's for every type it has (tests/test_quantize_fallback.py) and which takes no
    importance matrix; the note says so, None for ggml's own. The one place that decides."""
    try:
        from nanoquant import _core
    except ImportError as e:
        missing = f"{type(e).__name__}: {e}"
    else:
        return (lambda rows, imatrix=None: _core.quantize_rows(rows, int(target), imatrix)), None
    block = gguf.GGML_QUANT_SIZES[target][0]
    try:  # gguf-py registers some types for dequantization only; one block of zeros tells
        gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), target)
    except NotImplementedError:
        raise ValueError(f"{target.name}: gguf-py has no quantizer for {target.name}, and "
                         f"nanoquant._core (ggml's quantizers, built by `make`) cannot be imported ({missing}); "
                         "build it, or choose a type gguf-py quantizes (Q8_0, F16, ...; the token embedding's and "
                         "the head's defaults are K-quants)") from None

    def quantize(rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        return np.asarray(gguf.quants.quantize(rows, target)).view(np.uint8).reshape(rows.shape[0], -1)

    return quantize, (f"gguf-py's numpy {target.name} quantizer, without importance matrix (nanoquant._core cannot "
                      f"be imported: {missing})")


def _requantize(name: str, t, target: GGMLQuantizationType, quantize_rows: Callable[..., np.ndarray] | None,
                imatrix: np.ndarray | None = None):
    """(data, raw_dtype) of a base tensor in the requested type (or its row fallback, fitting_type); 1-D tensors and
    norms stay F32. quantize_rows: row_quantizer's for that type, for a target other than F32 and F16."""
    if t.tensor_type == target:
        return np.asarray(t.data), t.tensor_type
    values = np.asarray(dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)
    values = values.reshape([int(x) for x in reversed(t.shape)])
    if values.ndim < 2 or name.endswith("norm.weight") or fitting_type(target, values.shape[-1]) == T.F32:
        return values, GGMLQuantizationType.F32
    if target in FLOAT_TYPES:
        return values.astype(np.float32 if target == GGMLQuantizationType.F32 else np.float16), target
    packed = quantize_rows(values.reshape(-1, values.shape[-1]), imatrix)
    return packed.reshape(*values.shape[:-1], packed.shape[-1]), target


def copy_metadata(reader: GGUFReader, writer: GGUFWriter, skip: set[str] = frozenset()) -> None:
    """Every key of `reader` except GGUF's own, the architecture (the writer sets it) and `skip`."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in skip:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)


def rewrite_gguf(src: Path, dst: Path, edit, extra_keys=None, drop_keys: frozenset[str] = frozenset()) -> Path:
    """dst: src's metadata (less drop_keys) and tensors after edit(list of [name, data, ggml type]) changed the list in
    place and extra_keys(writer), if given, added keys."""
    reader = GGUFReader(src)
    tensors = [[t.name, np.array(t.data), t.tensor_type] for t in reader.tensors]
    edit(tensors)
    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    copy_metadata(reader, writer, skip=set(drop_keys))
    if extra_keys is not None:
        extra_keys(writer)
    for name, data, dtype in tensors:
        writer.add_tensor(name, data, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def finish_gguf(writer: GGUFWriter, tmp_path: Path, out_path: Path, progress: bool = False) -> None:
    """Write a filled GGUFWriter (opened on tmp_path) and rename it to out_path; on failure remove tmp_path."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        os.replace(tmp_path, out_path)
    except BaseException:
        writer.close()
        tmp_path.unlink(missing_ok=True)
        raise


def write_nq_gguf(base_path: Path, out_path: Path, layers: list[NQLayerTensors], types: TensorTypes,
                  extra_metadata: dict[str, tuple[object, GGUFValueType]],
                  head_imatrix: np.ndarray | None = None) -> None:
    """head_imatrix: the output head's importance per input column (the mean square of its inputs over the
    calibration windows, llama.cpp's imatrix), used where the head is quantised; its I-quants need it."""
    base_path, out_path = Path(base_path), Path(out_path)
    for layer in layers:  # a NaN, Inf or overflowing scale makes every logit NaN: refuse it here, not at the prompt
        for suffix, scale in layer.scales():
            if not np.isfinite(scale).all():
                raise ValueError(f"{out_path}: {layer.base}.{suffix} has {int((~np.isfinite(scale)).sum())} non-finite "
                                 "values (NaN or Inf); the conversion diverged, nothing was written")
            if np.abs(scale).max(initial=0.0) > nq1.SCALE_MAX:
                raise ValueError(f"{out_path}: {layer.base}.{suffix} has a scale of {np.abs(scale).max():g}, beyond "
                                 f"the {nq1.SCALE_MAX:g} readers accept; the conversion diverged, nothing was written")

    reader = GGUFReader(base_path)
    arch = reader.fields["general.architecture"].contents()
    replaced = {name for layer in layers for name in layer.replaced_weights}
    biases = {name: values for layer in layers for name, values in layer.biases.items()}
    missing = sorted((replaced | set(biases)) - {t.name for t in reader.tensors})
    if missing:
        raise ValueError(f"{base_path}: has no tensors {', '.join(missing[:5])} to replace")
    tied = OUTPUT not in {t.name for t in reader.tensors}

    planned = {}  # name -> the type it is written in, for the tensors that are requantised
    for t in reader.tensors:
        if t.name in replaced or t.name in biases or len(t.shape) < 2 or t.name.endswith("norm.weight"):
            continue
        target = fitting_type(types.for_tensor(t.name, tied, int(t.shape[0])), int(t.shape[0]))
        planned[t.name] = target
        if target in IMATRIX_TYPES and t.tensor_type != target and not (is_head(t.name, tied) and
                                                                         head_imatrix is not None):
            raise ValueError(f"{out_path}: {t.name} in {target.name} needs an importance matrix, and the "
                             "calibration statistics have none for it (a work folder made before they were "
                             "kept?); choose a K-quant for it")
    quantizers = {}
    for target in set(planned.values()) - set(FLOAT_TYPES) - {T.F32}:
        quantizers[target], note = row_quantizer(target)
        if note:
            print(f"writing: {target.name} tensors by {note}")
    shown = {role: planned[name].name for role, name in (("token embedding", TOKEN_EMBD), ("output head", OUTPUT))
             if name in planned}
    if shown:
        print("writing: " + ", ".join(f"{role} {name}" for role, name in shown.items())
              + (" (tied: the embedding is the head)" if tied else ""))
    tmp_path = out_path.with_name(out_path.name + ".partial")
    writer = GGUFWriter(tmp_path, arch)
    try:
        copy_metadata(reader, writer, skip={"general.file_type", nq1.KEY_FORMAT_VERSION, *extra_metadata})
        writer.add_file_type(int(nq1.NQ1_FTYPE))
        writer.add_uint32(nq1.KEY_FORMAT_VERSION, nq1.FORMAT_VERSION)
        for key, (value, vtype) in extra_metadata.items():
            writer.add_key_value(key, value, vtype)

        for t in reader.tensors:
            if t.name in replaced:
                continue
            if t.name in biases:
                writer.add_tensor(t.name, np.ascontiguousarray(biases[t.name], dtype=np.float32))
                continue
            target = planned.get(t.name, types.other)
            importance = head_imatrix if is_head(t.name, tied) else None
            data, dtype = _requantize(t.name, t, target, quantizers.get(target), importance)
            writer.add_tensor(t.name, data, raw_dtype=dtype)
        for layer in layers:
            writer.add_tensor(f"{layer.base}.{nq1.SUFFIX_V}", nq1.pack_signs(layer.v), raw_dtype=nq1.NQ1)
            writer.add_tensor(f"{layer.base}.{nq1.SUFFIX_U}", nq1.pack_signs(layer.u), raw_dtype=nq1.NQ1)
            for suffix, s in layer.scales():
                writer.add_tensor(f"{layer.base}.{suffix}", np.ascontiguousarray(s, dtype=np.float32))
    except BaseException:
        writer.close()
        tmp_path.unlink(missing_ok=True)
        raise
    finish_gguf(writer, tmp_path, out_path, progress=True)
