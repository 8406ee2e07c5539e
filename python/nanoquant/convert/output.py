"""The last stage, the file: NanoQuant tensors in llama.cpp's row order, the ordinary tensors' types by role, the
settings record the file keeps, and the summary printed at the end."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import gguf
import numpy as np
import torch

from nanoquant.convert.admm import LowRankBinary
from nanoquant.convert.architectures import gguf_base_name, gguf_row_permutation
from nanoquant.convert.blocks import LayerReport
from nanoquant.convert.checkpoint import as_jsonable
from nanoquant.convert.settings import CHAT_AUTO, CHAT_NONE, ConvertSettings
from nanoquant.convert.units import member_names
from nanoquant.fileformat.writer import NQLayerTensors, TensorTypes


def to_file_order(arch, config, n_layers, name, layer: LowRankBinary, bias: torch.Tensor | None,
                   rows: list[int]) -> NQLayerTensors:
    """The unit's tensors in llama.cpp's row order, each member's rows permuted as llama.cpp's converter permutes
    that linear; a shared-input unit's tuned biases stay its members' own tensors (llama.cpp adds them to the fused
    product as they are)."""
    host = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
    u, s_post, bias = host(layer.u), host(layer.s_post), host(bias)
    bounds = np.cumsum([0, *rows])
    order, biases, replaces = [], {}, []
    for member, start, stop in zip(member_names(name), bounds[:-1], bounds[1:]):
        perm = gguf_row_permutation(arch, member.split(".", 3)[-1], int(stop - start), config)
        rows_in_file = np.arange(start, stop) if perm is None else start + perm
        order.append(rows_in_file)
        base = gguf_base_name(arch, n_layers, member)
        replaces.append(base)
        if bias is not None:
            biases[f"{base}.bias"] = bias[rows_in_file]
    order = np.concatenate(order)
    return NQLayerTensors(base=gguf_base_name(arch, n_layers, name), u=u[order], v=host(layer.v),
                          s_pre=host(layer.s_pre), s_post=s_post[order], biases=biases, replaces=tuple(replaces),
                          s_mid=host(layer.s_mid))


def print_summary(reports: list[LayerReport], out: Path, seconds: float, peak_mib: float) -> None:
    print(f"\n{'layer':<34} {'shape':>11} {'rank':>5} {'bpw':>6} {'rel.err':>8} {'D-w.err':>8}")
    for r in reports:
        print(f"{r.name:<34} {f'{r.d_out}x{r.d_in}':>11} {r.rank:>5} {r.bpw:>6.3f} {r.rel_error:>8.4f} "
              f"{r.weighted_error:>8.4f}")
    bpw = sum(r.bpw * r.d_out * r.d_in for r in reports) / sum(r.d_out * r.d_in for r in reports)  # all bits / weights
    mean_err = float(np.mean([r.rel_error for r in reports]))
    print(f"\nquantized layers: {len(reports)}, realized bpw {bpw:.4f}, mean relative error {mean_err:.4f}")
    print(f"wrote {out} ({out.stat().st_size:,} bytes) in {seconds:.0f} s, peak RSS {peak_mib:.0f} MiB")


def settings_record(settings: ConvertSettings) -> str:
    """The settings a file was made with, as the JSON its metadata keeps: every method setting and step count, the
    calibration text and conversations by name (a local path says nothing on another machine), not the thread count,
    the device nor activation recomputation (speed and memory only)."""
    chat = settings.calib_chat if settings.calib_chat in (CHAT_AUTO, CHAT_NONE) else Path(settings.calib_chat).name
    record = as_jsonable(asdict(replace(settings, calib_text=Path(settings.calib_text.name), calib_chat=chat)))
    del record["threads"], record["device"], record["distill"]["recompute"]  # memory and speed only
    return json.dumps(record, sort_keys=True)


def tensor_types(settings: ConvertSettings) -> TensorTypes:
    """The non-NanoQuant tensors' types by role (the head None: llama-quantize's low-bit choice, see TensorTypes)."""
    named = lambda name: None if name is None else gguf.GGMLQuantizationType[name.upper()]  # noqa: E731
    return TensorTypes(other=named(settings.other_type), token_embd=named(settings.token_embd_type),
                       output=named(settings.output_type))
