"""Baselines for the quality table that llama.cpp has no type for.

    python -m bench.baselines sign F32.gguf OUT.gguf

`sign`: every decoder linear weight becomes alpha_row * sign(W) with alpha_row = mean |W_row| (the L2-optimal row
scale), the naive 1-bit binarisation. It is stored as F16 so stock kernels can score it; its bits are counted as
the 1-bit packing plus one 16-bit scale per row would take.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from nanoquant.fileformat.info import DECODER_LINEAR
from nanoquant.fileformat.writer import copy_metadata, finish_gguf


def row_sign(weight: np.ndarray) -> np.ndarray:
    alpha = np.abs(weight).mean(axis=1, keepdims=True)
    return np.where(weight < 0, -alpha, alpha)


def write_sign_baseline(f32_path: Path, out_path: Path) -> int:
    reader = GGUFReader(f32_path)
    tmp = out_path.with_name(out_path.name + ".partial")
    writer = GGUFWriter(tmp, reader.fields["general.architecture"].contents())
    changed = 0
    try:
        copy_metadata(reader, writer, skip={"general.file_type"})
        for t in reader.tensors:
            base, _, suffix = t.name.rpartition(".")
            if suffix == "weight" and DECODER_LINEAR.search(base):
                if t.tensor_type != GGMLQuantizationType.F32:
                    raise ValueError(f"{f32_path}: {t.name} is {t.tensor_type.name}, expected an F32 model")
                weight = np.asarray(t.data, dtype=np.float32).reshape(int(t.shape[1]), int(t.shape[0]))
                writer.add_tensor(t.name, row_sign(weight).astype(np.float16))
                changed += 1
            else:
                writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finish_gguf(writer, tmp, out_path)
    return changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Baseline GGUFs for the quality table")
    p.add_argument("kind", choices=["sign"])
    p.add_argument("model", type=Path, help="an F32 GGUF")
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    try:
        n = write_sign_baseline(args.model, args.out)
    except (ValueError, OSError, KeyError) as e:
        print(f"bench.baselines: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {n} decoder linear layers binarised per row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
