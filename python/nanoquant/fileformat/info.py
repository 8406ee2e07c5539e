"""What a NanoQuant GGUF holds: its layers, ranks and the bits they take, counted from the file."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from nanoquant.fileformat import nq1


class NQFormatError(ValueError):
    """A file that is not a valid NanoQuant GGUF; the message names the file and the tensor."""


def open_gguf(path: Path) -> GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf-py raises assorted errors on truncated or corrupt files
        raise NQFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


@dataclass
class NQLayerInfo:
    base: str
    d_out: int
    d_in: int
    rank: int
    bits: int

    @property
    def bpw(self) -> float:
        return self.bits / (self.d_out * self.d_in)


@dataclass
class FileInfo:
    path: Path
    architecture: str
    size_bytes: int
    layers: list[NQLayerInfo]
    dense_parameters: int  # parameters of the equivalent dense model (each NQ layer counted as d_out x d_in)
    conversion_settings: dict | None = None  # what the converter ran with (files from before it was recorded: None)

    @property
    def bpw_linear(self) -> float:
        """Bits of the NanoQuant tensors (signs and scales) per weight of the layers they replace."""
        return sum(l.bits for l in self.layers) / max(1, sum(l.d_out * l.d_in for l in self.layers))

    @property
    def bpw_file(self) -> float:
        return 8 * self.size_bytes / self.dense_parameters


def check_format_version(reader: GGUFReader, path: Path) -> None:
    """A file with NanoQuant tensors names a format version this package reads (nq1.KEY_FORMAT_VERSION)."""
    example = next((t.name for t in reader.tensors if t.name.rpartition(".")[2] in nq1.SUFFIXES), None)
    if example is None:
        return
    readable = ", ".join(map(str, nq1.READABLE_FORMAT_VERSIONS))
    field = reader.fields.get(nq1.KEY_FORMAT_VERSION)
    if field is None:
        raise NQFormatError(f"{path}: has NanoQuant tensors ({example}) but no {nq1.KEY_FORMAT_VERSION} key; this "
                            f"package reads NanoQuant format version {readable} (convert the model again)")
    version = field.contents()
    if field.types != [GGUFValueType.UINT32] or version not in nq1.READABLE_FORMAT_VERSIONS:
        raise NQFormatError(f"{path}: NanoQuant format version {version!r} ({field.types[0].name}); this package "
                            f"reads version {readable} (uint32)")


def describe(path: Path) -> FileInfo:
    path = Path(path)
    reader = open_gguf(path)
    check_format_version(reader, path)
    by_name = {t.name: t for t in reader.tensors}
    layers, dense = [], 0
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        if suffix == nq1.SUFFIX_V:
            u = by_name.get(f"{base}.{nq1.SUFFIX_U}")
            if u is None:
                raise NQFormatError(f"{path}: {t.name} has no matching {base}.{nq1.SUFFIX_U}")
            d_in, rank = int(t.shape[0]), int(t.shape[1])
            d_out = int(u.shape[1])
            check_scales(path, base, by_name)
            bits = sum(8 * int(by_name[f"{base}.{s}"].n_bytes) for s in nq1.SUFFIXES if f"{base}.{s}" in by_name)
            layers.append(NQLayerInfo(base, d_out, d_in, rank, bits))
            dense += d_out * d_in
        elif suffix not in nq1.SUFFIXES:
            dense += int(t.n_elements)
    arch = reader.fields["general.architecture"].contents()
    settings = reader.fields.get(nq1.KEY_SETTINGS)
    return FileInfo(path, arch, path.stat().st_size, layers, dense,
                    json.loads(settings.contents()) if settings is not None else None)


def check_scales(path: Path, base: str, by_name: dict) -> None:
    """A layer's scales are F32 and finite: one NaN or Inf in a scale makes every logit NaN."""
    for suffix in nq1.SCALE_SUFFIXES:
        t = by_name.get(f"{base}.{suffix}")
        if t is None:
            continue
        if t.tensor_type != GGMLQuantizationType.F32:
            raise NQFormatError(f"{path}: {t.name} is {t.tensor_type.name}, expected F32")
        values = np.asarray(t.data)
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise NQFormatError(f"{path}: {t.name} has {bad} non-finite values (NaN or Inf), expected finite scales")
        if np.abs(values).max(initial=0.0) > nq1.SCALE_MAX:
            raise NQFormatError(f"{path}: {t.name} has a scale of {np.abs(values).max():g}, expected at most "
                                f"{nq1.SCALE_MAX:g} in magnitude (the F16 range of the activations' block scales)")


# llama.cpp's names of the decoder linear layers, the ones NanoQuant replaces and bpw_linear counts
DECODER_LINEAR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_qkv|attn_output|ffn_gate|ffn_up|ffn_down)$")


def _decoder_linears(path: Path) -> list[tuple[str, int, int, int]]:
    """(base, d_out, d_in, bits) of every decoder linear layer, dense or NanoQuant, counted from the file."""
    info = describe(path)
    found = [(l.base, l.d_out, l.d_in, l.bits) for l in info.layers if DECODER_LINEAR.search(l.base)]
    for t in open_gguf(path).tensors:
        base, _, suffix = t.name.rpartition(".")
        if suffix == "weight" and DECODER_LINEAR.search(base):
            found.append((base, int(t.shape[1]), int(t.shape[0]), 8 * int(t.n_bytes)))
    return found


def decoder_linear_bits(path: Path) -> tuple[int, int]:
    """(bits stored, weights represented) over the decoder linear layers: bpw_linear = bits / weights."""
    layers = _decoder_linears(path)
    return sum(b for *_, b in layers), sum(o * i for _, o, i, _ in layers)


def decoder_linear_shapes(path: Path) -> list[tuple[int, int]]:
    return [(o, i) for _, o, i, _ in _decoder_linears(path)]
