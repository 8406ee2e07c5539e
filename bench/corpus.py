"""Malformed GGUF files, one defect each, made from a valid file; and how llama.cpp's tools and nanoquant.Model answer
each of them.

A structural defect (a header field, a truncation, a tensor of the wrong type, shape or rank, a missing, extra or
duplicate tensor, a non-finite norm or scale) must be refused, and the refusal must carry its reason: each defect
names the text the reason must contain (the tensor, the key or what gguf found wrong). A data defect (a flipped bit
in the signs of a factor or in a weight's low mantissa: still a valid file of other weights) may load. No defect may
crash a tool (a signal), hang it, or end the Python process.

The same generator serves NQ files and ordinary ones: defects that need NanoQuant tensors apply to NQ files only.
    python -m bench.corpus FILE.gguf OUT_DIR     writes the variants of FILE (for looking at them by hand)
bench/malformed.py runs every variant through every tool and writes the counts the README shows.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from nanoquant.fileformat import nq1
from nanoquant.fileformat.writer import rewrite_gguf

from bench.serverload import Server, ServerFailed

STRUCTURAL, DATA = "structural", "data"
REFUSED, ACCEPTED, CRASH, HANG, NO_REASON = "refused", "accepted", "crash", "hang", "refused without the reason"
SEED = 21  # the bit flips' positions


# --- rewriting a file -------------------------------------------------------------------------------------------
def patch_in_place(src: Path, dst: Path, edit: Callable[[gguf.GGUFReader], None]) -> Path:
    """dst: a byte copy of src after edit(reader opened read-write on dst) wrote into the header's fields."""
    shutil.copyfile(src, dst)
    edit(gguf.GGUFReader(dst, "r+"))
    return dst


def patch_bytes(src: Path, dst: Path, edit: Callable[[bytearray, gguf.GGUFReader], None]) -> Path:
    data = bytearray(src.read_bytes())
    edit(data, gguf.GGUFReader(src))
    dst.write_bytes(bytes(data))
    return dst


# --- what a file holds: the tensors the defects aim at -------------------------------------------------------------
@dataclass(frozen=True)
class Anchors:
    arch: str
    n_blocks: int
    names: tuple[str, ...]
    types: dict[str, T]
    nq_base: str | None   # the first NanoQuant layer (with the most scales) or None in an ordinary file
    norm: str             # a norm weight of block 0
    linear: str           # a linear layer's stored weight: nq_base's V, or a dense .weight

    @staticmethod
    def of(path: Path) -> Anchors:
        reader = gguf.GGUFReader(path)
        names = tuple(t.name for t in reader.tensors)
        types = {t.name: T(t.tensor_type) for t in reader.tensors}
        arch = str(reader.fields["general.architecture"].contents())
        n_blocks = int(reader.fields[f"{arch}.block_count"].contents())
        bases = [n[: -len(nq1.SUFFIX_V) - 1] for n in names if n.endswith("." + nq1.SUFFIX_V)]
        nq_base = max(bases, key=lambda b: sum(f"{b}.{s}" in names for s in nq1.SCALE_SUFFIXES)) if bases else None
        norm = next(n for n in names if n.startswith("blk.0.") and n.endswith("norm.weight"))
        linear = f"{nq_base}.{nq1.SUFFIX_V}" if nq_base else next(
            n for n in names if n.startswith("blk.0.") and n.endswith(".weight") and "norm" not in n)
        return Anchors(arch, n_blocks, names, types, nq_base, norm, linear)

    def nq(self, suffix: str) -> str:
        return f"{self.nq_base}.{suffix}"


@dataclass(frozen=True)
class Defect:
    name: str
    kind: str                                      # STRUCTURAL or DATA
    reason: Callable[[Anchors], str]               # text a refusal must contain
    make: Callable[[Path, Path, Anchors], Path]    # src, dst, anchors -> dst
    applies: Callable[[Anchors], bool] = lambda a: True


def _nq(a: Anchors) -> bool:
    return a.nq_base is not None


def _flippable(a: Anchors) -> bool:
    """Bits that can flip without leaving valid weights: any of NQ1's signs, the low mantissa bits of F32."""
    return a.types[a.linear] in (T.NQ1, T.F32)


def _tensor(tensors, name):
    return next(t for t in tensors if t[0] == name)


def _edit_tensor(pick: Callable[[Anchors], str], fn):
    """A rewrite that replaces the data and type of the tensor pick(anchors) by fn(data, type, anchors)."""
    def make(src, dst, a):
        def edit(tensors):
            t = _tensor(tensors, pick(a))
            t[1], t[2] = fn(t[1], t[2], a)
        return rewrite_gguf(src, dst, edit)
    return make


def _rewrite(fn):
    """A rewrite by fn(tensors, anchors) on the whole tensor list."""
    return lambda src, dst, a: rewrite_gguf(src, dst, lambda tensors: fn(tensors, a))


def _float_values(data, dtype):
    if dtype == T.NQ1:
        return nq1.unpack_signs(data, data.shape[-1] * 8)
    return gguf.quants.dequantize(data, dtype).astype(np.float32)


def _as(target: T):
    def fn(data, dtype, a):
        values = _float_values(data, dtype)
        if target == T.NQ1:
            return nq1.pack_signs(np.where(values.reshape(1, -1) < 0, -1.0, 1.0)), T.NQ1
        if target in (T.F32, T.F16):
            return values.astype(np.float32 if target == T.F32 else np.float16), target
        return gguf.quants.quantize(values.reshape(-1, values.shape[-1]), target), target
    return fn


def _value_at(index: int, value: float):
    def fn(data, dtype, a):
        data = data.copy()
        data.reshape(-1)[index] = value
        return data, dtype
    return fn


def _shorter(by: int):
    return lambda data, dtype, a: (data.reshape(-1)[:-by].copy(), dtype)


def _v_rows_added(rows: int):
    """V with `rows` more ranks than U has (rank not a multiple of 32, or V and U disagreeing)."""
    return lambda data, dtype, a: (np.concatenate([data, data[:rows]]), dtype)


def _narrower(data, dtype):
    """32 columns fewer: 32 values of a float tensor, or the bytes of 32 of a quantized one."""
    block, size = gguf.GGML_QUANT_SIZES[dtype]
    cut = nq1.BLOCK if dtype in (T.F32, T.F16) else size * nq1.BLOCK // block
    return np.ascontiguousarray(data[..., :-cut]), dtype


def _rank_zero(tensors, a):
    v, u = _tensor(tensors, a.nq(nq1.SUFFIX_V)), _tensor(tensors, a.nq(nq1.SUFFIX_U))
    v[1] = v[1][:0]
    u[1] = u[1][:, :0]
    for s in (nq1.SUFFIX_S_MID,):
        if a.nq(s) in a.names:
            tensors.remove(_tensor(tensors, a.nq(s)))


def _drop(pick):
    return _rewrite(lambda tensors, a: tensors.remove(_tensor(tensors, pick(a))))


def _add(name_of, data_of, dtype):
    return _rewrite(lambda tensors, a: tensors.append([name_of(a), data_of(tensors, a), dtype]))


def _dense_beside(tensors, a):
    v, u = _tensor(tensors, a.nq(nq1.SUFFIX_V))[1], _tensor(tensors, a.nq(nq1.SUFFIX_U))[1]
    tensors.append([f"{a.nq_base}.weight", np.zeros((u.shape[0], v.shape[1] * 8), np.float32), T.F32])


def _last_block_plus_one(name: str, a: Anchors) -> str:
    return re.sub(r"^blk\.\d+\.", f"blk.{a.n_blocks}.", name)


# header fields through gguf-py's read-write view of the file
def _header(field_of: Callable[[gguf.GGUFReader, Anchors], tuple[gguf.ReaderField, int]], value):
    """Writes `value` into part `index` of a field of the header."""
    def make(src, dst, a):
        def edit(reader):
            field, index = field_of(reader, a)
            field.parts[index][0] = value(field.parts[index][0]) if callable(value) else value
        return patch_in_place(src, dst, edit)
    return make


def _tensor_info(pick: Callable[[Anchors], str], part: int):
    """Part `part` of a tensor's info: 0 name length, 1 name, 2 n_dims, 3 dims, 4 type, 5 offset."""
    def field_of(reader, a):
        return next(t.field for t in reader.tensors if t.name == pick(a)), part
    return field_of


def _key(name_of: Callable[[Anchors], str], part: int):
    """Part `part` of a key-value field: 0 key length, 1 key, 2 value type, 3 the value (scalars)."""
    def field_of(reader, a):
        return reader.fields[name_of(a)], part
    return field_of


def _fixed(offset: int, dtype, value):
    """The fixed header: magic (0), version (4), tensor count (8), key count (16)."""
    def make(src, dst, a):
        def edit(data, reader):
            width = np.dtype(dtype).itemsize
            old = int(np.frombuffer(bytes(data[offset:offset + width]), dtype)[0])
            data[offset:offset + width] = np.array([value(old) if callable(value) else value], dtype).tobytes()
        return patch_bytes(src, dst, edit)
    return make


def _truncated(where: Callable[[gguf.GGUFReader], int]):
    def make(src, dst, a):
        reader = gguf.GGUFReader(src)
        dst.write_bytes(src.read_bytes()[: where(reader)])
        return dst
    return make


def _renamed_as(other: Callable[[Anchors], str], pick: Callable[[Anchors], str]):
    """The tensor pick(a) renamed to other(a), a name of the same length: two tensors of one name."""
    def make(src, dst, a):
        def edit(reader):
            field = next(t.field for t in reader.tensors if t.name == pick(a))
            new = other(a).encode()
            assert len(new) == len(field.parts[1]), (other(a), pick(a))
            field.parts[1][:] = np.frombuffer(new, np.uint8)
        return patch_in_place(src, dst, edit)
    return make


def _same_length_name(a: Anchors) -> str:
    return next(n for n in a.names if len(n) == len(a.linear) and n != a.linear)


def _bit_flips(pick: Callable[[Anchors], str], count: int, low_bits_only: bool = False):
    """`count` flipped bits at seeded places in the data of one tensor; low_bits_only keeps F32 values finite."""
    def make(src, dst, a):
        def edit(data, reader):
            t = next(t for t in reader.tensors if t.name == pick(a))
            rng = np.random.default_rng(SEED)
            for _ in range(count):
                if low_bits_only:  # a bit of the low mantissa byte of a 4-byte value
                    byte = t.data_offset + 4 * int(rng.integers(t.n_bytes // 4))
                    bit = int(rng.integers(8))
                else:
                    byte, bit = t.data_offset + int(rng.integers(t.n_bytes)), int(rng.integers(8))
                data[byte] ^= 1 << bit
        return patch_bytes(src, dst, edit)
    return make


def _tensor_infos_start(reader: gguf.GGUFReader) -> int:
    return reader.tensors[0].field.offset


V = lambda a: a.nq(nq1.SUFFIX_V)  # noqa: E731
U = lambda a: a.nq(nq1.SUFFIX_U)  # noqa: E731
S_PRE = lambda a: a.nq(nq1.SUFFIX_S_PRE)  # noqa: E731
S_POST = lambda a: a.nq(nq1.SUFFIX_S_POST)  # noqa: E731
NORM = lambda a: a.norm  # noqa: E731
LINEAR = lambda a: a.linear  # noqa: E731
BLOCK_COUNT = lambda a: f"{a.arch}.block_count"  # noqa: E731
WIDTH = lambda a: f"{a.arch}.embedding_length"  # noqa: E731


def _named(pick):
    return lambda a: pick(a)


def _text(text: str):
    return lambda a: text


DEFECTS: tuple[Defect, ...] = (
    # --- the fixed header and the key-value section (gguf's own checks) ---
    Defect("magic", STRUCTURAL, _text("GGUF"), _fixed(0, np.uint32, 0x58554747)),
    Defect("version-0", STRUCTURAL, _text("version"), _fixed(4, np.uint32, 0)),
    Defect("version-99", STRUCTURAL, _text("version"), _fixed(4, np.uint32, 99)),
    Defect("tensor-count-plus-one", STRUCTURAL, _text("tensor"), _fixed(8, np.int64, lambda n: n + 1)),
    Defect("tensor-count-huge", STRUCTURAL, _text("tensor"), _fixed(8, np.int64, 1 << 60)),
    Defect("key-count-plus-one", STRUCTURAL, _text("exceeds"), _fixed(16, np.int64, lambda n: n + 1)),
    Defect("key-count-huge", STRUCTURAL, _text("key"), _fixed(16, np.int64, 1 << 60)),
    Defect("key-length-huge", STRUCTURAL, _text("key-value"), _header(_key(BLOCK_COUNT, 0), 1 << 40)),
    Defect("value-type-unknown", STRUCTURAL, _text("type"), _header(_key(BLOCK_COUNT, 2), 99)),
    Defect("block-count-plus-one", STRUCTURAL, lambda a: f"blk.{a.n_blocks}.",
           _header(_key(BLOCK_COUNT, 3), lambda n: n + 1)),
    # what a wrong width breaks first depends on the model (a tensor's shape, or a derived size such as n_rot)
    Defect("width-plus-32", STRUCTURAL, _text(""), _header(_key(WIDTH, 3), lambda n: n + 32)),
    Defect("alignment-3", STRUCTURAL, _text("alignment"),
           lambda src, dst, a: rewrite_gguf(src, dst, lambda t: None,
                                            lambda w: w.add_uint32(gguf.Keys.General.ALIGNMENT, 3))),
    # --- tensor infos ---
    Defect("tensor-type-unknown", STRUCTURAL, _text("type"), _header(_tensor_info(LINEAR, 4), 99)),
    Defect("tensor-type-other-size", STRUCTURAL, _text("tensor data"), _header(_tensor_info(LINEAR, 4), int(T.Q4_0))),
    Defect("tensor-dims-5", STRUCTURAL, _text("dimensions"), _header(_tensor_info(LINEAR, 2), 5)),
    Defect("tensor-dim-huge", STRUCTURAL, _text("tensor data"), _header(_tensor_info(LINEAR, 3), 1 << 40)),
    Defect("tensor-offset-beyond-end", STRUCTURAL, _text("tensor data"), _header(_tensor_info(LINEAR, 5), 1 << 40)),
    Defect("tensor-offset-misaligned", STRUCTURAL, _text("offset"), _header(_tensor_info(LINEAR, 5), lambda o: o + 1)),
    Defect("tensor-name-duplicate", STRUCTURAL, _text("duplicate"), _renamed_as(_same_length_name, LINEAR)),
    # --- truncations ---
    Defect("truncated-in-fixed-header", STRUCTURAL, _text("header"), _truncated(lambda r: 12)),
    Defect("truncated-in-keys", STRUCTURAL, _text("key-value"), _truncated(lambda r: _tensor_infos_start(r) // 2)),
    Defect("truncated-in-tensor-infos", STRUCTURAL, _text("tensor info"),
           _truncated(lambda r: (_tensor_infos_start(r) + r.data_offset) // 2)),
    Defect("truncated-at-data", STRUCTURAL, _text("file bounds"), _truncated(lambda r: r.data_offset)),
    Defect("truncated-in-data", STRUCTURAL, _text("file bounds"),
           _truncated(lambda r: r.data_offset + (r.data.nbytes - r.data_offset) // 2)),
    Defect("truncated-last-byte", STRUCTURAL, _text("file bounds"), _truncated(lambda r: r.data.nbytes - 1)),
    # --- tensors: types, shapes, missing, extra ---
    Defect("norm-f16", STRUCTURAL, _named(NORM), _edit_tensor(NORM, _as(T.F16))),
    Defect("norm-q8_0", STRUCTURAL, _named(NORM), _edit_tensor(NORM, _as(T.Q8_0))),
    Defect("norm-nan", STRUCTURAL, _named(NORM), _edit_tensor(NORM, _value_at(2, np.nan))),
    Defect("norm-inf", STRUCTURAL, _named(NORM), _edit_tensor(NORM, _value_at(0, -np.inf))),
    Defect("norm-shorter", STRUCTURAL, _named(NORM), _edit_tensor(NORM, _shorter(32))),
    Defect("norm-missing", STRUCTURAL, _named(NORM), _drop(NORM)),
    Defect("extra-tensor", STRUCTURAL, _text("tensors"),
           _add(lambda a: "blk.0.unknown.weight", lambda tensors, a: np.ones(32, np.float32), T.F32)),
    Defect("linear-narrower", STRUCTURAL, _named(LINEAR), _edit_tensor(LINEAR, lambda d, t, a: _narrower(d, t))),
    # --- NanoQuant layers ---
    Defect("factor-f32", STRUCTURAL, _named(V), _edit_tensor(V, _as(T.F32)), applies=_nq),
    Defect("factor-f16", STRUCTURAL, _named(U), _edit_tensor(U, _as(T.F16)), applies=_nq),
    Defect("factor-q8_0", STRUCTURAL, _named(U), _edit_tensor(U, _as(T.Q8_0)), applies=_nq),
    Defect("scale-f16", STRUCTURAL, _named(S_PRE), _edit_tensor(S_PRE, _as(T.F16)), applies=_nq),
    Defect("scale-q8_0", STRUCTURAL, _named(S_POST), _edit_tensor(S_POST, _as(T.Q8_0)), applies=_nq),
    Defect("scale-nq1", STRUCTURAL, _named(S_PRE), _edit_tensor(S_PRE, _as(T.NQ1)), applies=_nq),
    Defect("scale-shorter", STRUCTURAL, _named(S_POST), _edit_tensor(S_POST, _shorter(1)), applies=_nq),
    Defect("scale-nan", STRUCTURAL, _named(S_POST), _edit_tensor(S_POST, _value_at(5, np.nan)), applies=_nq),
    Defect("scale-inf", STRUCTURAL, _named(S_PRE), _edit_tensor(S_PRE, _value_at(0, np.inf)), applies=_nq),
    # finite, but beyond the F16 block scales of the activations it multiplies: every logit NaN if it loaded
    Defect("scale-overflow", STRUCTURAL, _named(S_PRE), _edit_tensor(S_PRE, _value_at(0, 3e38)), applies=_nq),
    Defect("format-version-unknown", STRUCTURAL, _text("format version is 2"),
           _header(_key(lambda a: nq1.KEY_FORMAT_VERSION, 3), 2), applies=_nq),
    Defect("format-version-missing", STRUCTURAL, _text(nq1.KEY_FORMAT_VERSION),
           lambda src, dst, a: rewrite_gguf(src, dst, lambda t: None, drop_keys=frozenset({nq1.KEY_FORMAT_VERSION})),
           applies=_nq),
    Defect("rank-not-multiple-of-32", STRUCTURAL, lambda a: a.nq_base, _edit_tensor(V, _v_rows_added(16)), applies=_nq),
    Defect("rank-v-u-disagree", STRUCTURAL, lambda a: a.nq_base, _edit_tensor(V, _v_rows_added(32)), applies=_nq),
    Defect("rank-zero", STRUCTURAL, lambda a: a.nq_base, _rewrite(_rank_zero), applies=_nq),
    Defect("missing-v", STRUCTURAL, _named(V), _drop(V), applies=_nq),
    Defect("missing-u", STRUCTURAL, _named(U), _drop(U), applies=_nq),
    Defect("dense-beside-nq", STRUCTURAL, lambda a: f"{a.nq_base}.weight", _rewrite(_dense_beside), applies=_nq),
    Defect("nq-on-a-norm", STRUCTURAL, lambda a: a.norm[: -len(".weight")],
           _add(lambda a: a.norm[: -len("weight")] + nq1.SUFFIX_V,
                lambda tensors, a: _tensor(tensors, V(a))[1].copy(), T.NQ1), applies=_nq),
    Defect("nq-beyond-last-block", STRUCTURAL, lambda a: _last_block_plus_one(V(a), a),
           _add(lambda a: _last_block_plus_one(V(a), a), lambda tensors, a: _tensor(tensors, V(a))[1].copy(), T.NQ1), applies=_nq),
    Defect("nq-unknown-suffix", STRUCTURAL, lambda a: f"{a.nq_base}.nq_w",
           _add(lambda a: f"{a.nq_base}.nq_w", lambda tensors, a: np.ones(32, np.float32), T.F32), applies=_nq),
    # --- data defects: other valid weights ---
    Defect("bit-flips-in-linear", DATA, _text(""),
           lambda src, dst, a: _bit_flips(LINEAR, 8, low_bits_only=a.types[a.linear] != T.NQ1)(src, dst, a),
           applies=_flippable),
    Defect("bit-flips-in-u", DATA, _text(""), _bit_flips(U, 8), applies=_nq),
    Defect("bit-flips-in-scale-mantissa", DATA, _text(""), _bit_flips(S_POST, 4, low_bits_only=True), applies=_nq),
)


def variants(src: Path, out_dir: Path) -> dict[str, tuple[Defect, Path]]:
    """Every defect that applies to src, written to out_dir/<defect>.gguf."""
    anchors = Anchors.of(src)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    for defect in DEFECTS:
        if not defect.applies(anchors):
            continue
        made[defect.name] = (defect, defect.make(src, out_dir / f"{defect.name}.gguf", anchors))
    return made


# --- running the tools ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    result: str     # REFUSED, ACCEPTED, CRASH, HANG or NO_REASON
    detail: str     # the refusal's reason line, the signal, or what was missing


LINE_TOOLS = {
    "llama-completion": lambda f: ["-m", f, "-p", "hi", "-n", "2", "-no-cnv", "-t", "2"],
    "llama-cli": lambda f: ["-m", f, "-p", "hi", "-n", "2", "-st", "-t", "2", "--simple-io"],
    "llama-bench": lambda f: ["-m", f, "-p", "8", "-n", "2", "-r", "1", "-t", "2"],
}
TOOLS = (*LINE_TOOLS, "llama-server", "nanoquant.Model")
TIMEOUT_S = 60


# lines that say a load failed but not why: a refusal needs a line beside them that does
_GENERIC = re.compile(r"failed to load model|exited before becoming ready|exiting due to model loading error|"
                      r"could not load the model|encountered an error while trying to fit")
_FAILURE_WORDS = re.compile(r"error|fail|invalid|expected|refus|bad|not within|duplicate|missing|non-finite|wrong|"
                            r"must be|exceeds|not a |only supports")


def _reason_line(text: str, reason: str, path: Path) -> str | None:
    """The line of a tool's output that states the reason (with `reason` in it, the file's own name aside), None if
    no line does."""
    for line in text.splitlines():
        low = line.replace(str(path), "<file>").lower()
        if _FAILURE_WORDS.search(low) and not _GENERIC.search(low) and reason.lower() in low:
            return line.strip()
    return None


def _judge(returncode: int | None, text: str, reason: str, path: Path) -> Outcome:
    if returncode is None:
        return Outcome(HANG, f"no answer in {TIMEOUT_S} s")
    if returncode < 0:
        return Outcome(CRASH, signal.Signals(-returncode).name)
    if returncode == 0:
        return Outcome(ACCEPTED, "")
    line = _reason_line(text, reason, path)
    return Outcome(REFUSED, line) if line else Outcome(NO_REASON, f"exit {returncode}, no line with '{reason}'")


def run_line_tool(bin_dir: Path, tool: str, path: Path, reason: str) -> Outcome:
    try:
        proc = subprocess.run([str(bin_dir / tool), *map(str, LINE_TOOLS[tool](path))], capture_output=True,
                              text=True, errors="replace", timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return _judge(None, "", reason, path)
    return _judge(proc.returncode, proc.stdout + proc.stderr, reason, path)


def run_server(bin_dir: Path, path: Path, reason: str) -> Outcome:
    """llama-server on loopback: a refused file ends the server with its reason; an accepted one answers /health."""
    try:
        with Server(bin_dir, path, ctx_per_slot=256, start_timeout_s=TIMEOUT_S):
            return Outcome(ACCEPTED, "")
    except ServerFailed as failed:
        return _judge(failed.returncode, failed.output if failed.returncode is not None else "", reason, path)


_LOAD_SCRIPT = """
import json, sys
from nanoquant import Model
out = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        with Model(path, n_ctx=64, n_threads=2) as model:
            out[name] = ["", ""] if bool(__import__("numpy").isfinite(model.logits([1, 2])).all()) else \
                ["NaN logits", ""]
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
    print(json.dumps({name: out[name]}), flush=True)
"""


def run_python(paths: dict[str, Path], reasons: dict[str, str]) -> dict[str, Outcome]:
    """nanoquant.Model on every file, in child interpreters: an abort is the child's signal, not the caller's end.
    One child takes files until one ends it; the rest go on in a new child."""
    outcomes: dict[str, Outcome] = {}
    todo = dict(paths)
    while todo:
        try:
            proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, json.dumps({k: str(v) for k, v in todo.items()})],
                                  capture_output=True, text=True, timeout=TIMEOUT_S * len(todo))
            lines, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            lines, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), None
        for line in lines.splitlines():
            if line.startswith("{"):
                (name, (kind, message)), = json.loads(line).items()
                if not kind:
                    outcomes[name] = Outcome(ACCEPTED, "")
                elif kind != "ModelLoadError":
                    outcomes[name] = Outcome(NO_REASON if kind == "NaN logits" else CRASH, f"{kind}: {message[:200]}")
                else:
                    line_ = _reason_line(message, reasons[name], paths[name])
                    outcomes[name] = Outcome(REFUSED, line_) if line_ and str(paths[name]) in message else \
                        Outcome(NO_REASON, message[:300])
                todo.pop(name)
        if rc != 0 and todo:  # the first file left ended the child
            name = next(iter(todo))
            outcomes[name] = Outcome(HANG, "") if rc is None else Outcome(CRASH, f"interpreter exit {rc}")
            todo.pop(name)
    return outcomes


def run_corpus(bin_dir: Path, made: dict[str, tuple[Defect, Path]], src: Path,
               tools: tuple[str, ...] = TOOLS, progress: Callable[[str], None] = lambda s: None) -> dict:
    """defect -> tool -> Outcome, for every variant and tool."""
    anchors = Anchors.of(src)
    reasons = {name: defect.reason(anchors) for name, (defect, _) in made.items()}
    results: dict[str, dict[str, Outcome]] = {name: {} for name in made}
    for tool in tools:
        progress(tool)
        if tool == "nanoquant.Model":
            for name, outcome in run_python({n: p for n, (_, p) in made.items()}, reasons).items():
                results[name][tool] = outcome
            continue
        for name, (defect, path) in made.items():
            results[name][tool] = run_server(bin_dir, path, reasons[name]) if tool == "llama-server" else \
                run_line_tool(bin_dir, tool, path, reasons[name])
    return results


def failures(made: dict[str, tuple[Defect, Path]], results: dict) -> list[str]:
    """What the corpus forbids: any crash or hang, a refusal without its reason, a structural defect accepted."""
    bad = []
    for name, by_tool in results.items():
        defect = made[name][0]
        for tool, outcome in by_tool.items():
            if outcome.result in (CRASH, HANG, NO_REASON) or (defect.kind == STRUCTURAL and
                                                              outcome.result == ACCEPTED):
                bad.append(f"{name} / {tool}: {outcome.result} {outcome.detail}".rstrip())
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    for name, (defect, path) in variants(args.model, args.out_dir).items():
        print(f"{defect.kind:10s} {name:32s} {path} ({os.path.getsize(path):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
