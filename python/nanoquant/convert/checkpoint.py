"""The converter's work folder: statistics, finished blocks and the activation streams, so a killed conversion
continues with `--resume` and writes the same bytes.

Layout: manifest.json (what is being converted, with which settings), chat.jsonl (the calibration conversations
the teacher answered), stats.pt, ranks.json, block-NNNN.pt (the factorised layers of one finished block, signs packed),
stream.pt (the block-boundary activations after the last finished block), head.pt (the output head's factors with
--nq-head), final.pt (the file's NanoQuant tensors after
model reconstruction, so that a kept folder writes the file again without computing), time.json (the seconds and
peak RSS the runs that computed in it spent, updated at every checkpoint: a conversion's cost over all its runs).
Every file is written to a temporary name and renamed, so a kill never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import pickle
import resource
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from nanoquant.convert.admm import LowRankBinary
from nanoquant.convert.reconstruct import DistillSettings
from nanoquant.convert.settings import ConvertSettings, DEVICE_AUTO, WRITE_ONLY
from nanoquant.fileformat import nq1


class CheckpointError(RuntimeError):
    pass


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _pack(signs: torch.Tensor) -> dict:
    return {"bits": torch.from_numpy(nq1.pack_signs(signs.cpu().numpy())), "cols": signs.shape[1]}


def _host(t: torch.Tensor | None) -> torch.Tensor | None:
    """A checkpoint holds host tensors, so a conversion computed on a GPU resumes anywhere."""
    return None if t is None else t.cpu()


def _pack_np(signs: np.ndarray) -> dict:
    return {"bits": nq1.pack_signs(signs), "cols": signs.shape[1]}


def _unpack(packed: dict) -> torch.Tensor:
    return torch.from_numpy(nq1.unpack_signs(packed["bits"].numpy(), packed["cols"]))


class WorkFolder:
    def __init__(self, path: Path, identity: dict, resume: bool):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if resume:
            if not manifest.is_file():
                raise CheckpointError(f"--resume: {manifest} not found (nothing to resume in {self.path})")
            saved = json.loads(manifest.read_text())
            if saved != json.loads(json.dumps(identity)):
                changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
                raise CheckpointError(f"--resume: {self.path} was made by a different conversion "
                                      f"(differs in: {', '.join(changed)}); remove it or start without --resume")
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise CheckpointError(f"work folder {self.path} is not empty: pass --resume to continue it, "
                                      f"or remove it")
            self.path.mkdir(parents=True, exist_ok=True)
            manifest.write_text(json.dumps(identity, indent=1, sort_keys=True))
        self._opened = time.time()
        self._spent_before = self.spent()
        self.computed = False  # whether this run checkpointed anything (a kept folder only written again: no)

    def spent(self) -> dict:
        """{"seconds", "peak_rss_mib"} of the runs that computed in this folder, up to their last checkpoint."""
        path = self.path / "time.json"
        return json.loads(path.read_text()) if path.is_file() else {"seconds": 0.0, "peak_rss_mib": 0.0}

    def record_time(self) -> None:
        """Adds this run's time so far to what earlier runs spent (called at each checkpoint and after writing)."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process's peak, KiB on Linux
        spent = {"seconds": round(self._spent_before["seconds"] + time.time() - self._opened, 1),
                 "peak_rss_mib": round(max(self._spent_before["peak_rss_mib"], peak), 1)}
        self.computed = True
        tmp = self.path / "time.json.tmp"
        tmp.write_text(json.dumps(spent))
        os.replace(tmp, self.path / "time.json")

    def load_conversations(self) -> list[list[dict]] | None:
        path = self.path / "chat.jsonl"
        if not path.is_file():
            return None
        return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]

    def save_conversations(self, conversations: list[list[dict]]) -> None:
        path = self.path / "chat.jsonl"
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations),
                       encoding="utf-8")
        os.replace(tmp, path)
        self.record_time()

    def load_ranks(self) -> dict[str, int] | None:
        path = self.path / "ranks.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_ranks(self, ranks: dict[str, int]) -> None:
        path = self.path / "ranks.json"
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(ranks, indent=0))
        os.replace(tmp, path)
        self.record_time()

    def holds_progress(self) -> bool:
        """Whether --resume would save work here: the statistics or a finished block are checkpointed."""
        return (self.path / "stats.pt").is_file() or self._block_path(0).is_file()

    def load_stats(self) -> dict | None:
        path = self.path / "stats.pt"
        return _load(path) if path.is_file() else None

    def save_stats(self, stats: dict) -> None:
        _atomic_save({name: s.to("cpu") for name, s in stats.items()}, self.path / "stats.pt")
        self.record_time()

    def _block_path(self, index: int) -> Path:
        return self.path / f"block-{index:04d}.pt"

    def finished_blocks(self) -> int:
        """How many leading blocks are finished; the stream must belong to the last of them."""
        n = 0
        while self._block_path(n).is_file():
            n += 1
        if n and not (self.path / "stream.pt").is_file():
            return 0
        if n:
            stream_block = _load(self.path / "stream.pt")["after_block"]
            n = min(n, stream_block + 1)
        return n

    def save_block(self, index: int, layers: dict[str, tuple[LowRankBinary, torch.Tensor | None]],
                   reports: list, stream: dict) -> None:
        _atomic_save(_layers_payload(layers, reports), self._block_path(index))
        _atomic_save({**{k: _host(t) for k, t in stream.items()}, "after_block": index}, self.path / "stream.pt")
        self.record_time()

    def load_block(self, index: int) -> tuple[dict[str, tuple[LowRankBinary, torch.Tensor | None]], list]:
        return _layers_from(_load(self._block_path(index)))

    def save_head(self, layer: LowRankBinary, report) -> None:
        """The output head's factors (--nq-head), made after the last block."""
        _atomic_save(_layers_payload({"head": (layer, None)}, [report]), self.path / "head.pt")
        self.record_time()

    def load_head(self) -> tuple[LowRankBinary, object] | None:
        path = self.path / "head.pt"
        if not path.is_file():
            return None
        layers, reports = _layers_from(_load(path))
        return layers["head"][0], reports[0]

    def load_stream(self) -> dict:
        return _load(self.path / "stream.pt")

    def save_final(self, tensors: list, reports: list, key: dict) -> None:
        """The file's NanoQuant tensors after model reconstruction, under the settings that made them (`key`): a
        kept work folder writes the file again, with other tensor types, without running anything."""
        packed = [{**vars(t), "u": _pack_np(t.u), "v": _pack_np(t.v)} for t in tensors]
        _atomic_save({"key": key, "tensors": packed, "reports": reports}, self.path / "final.pt")
        self.record_time()

    def load_final(self, key: dict, make) -> tuple[list, list] | None:
        """(tensors, reports) saved by save_final under the same key, each tensor rebuilt by make(**fields)."""
        path = self.path / "final.pt"
        if not path.is_file():
            return None
        payload = _load(path)
        if payload["key"] != key:
            return None
        # int8 signs (the writer packs them again): float32 would be 4 bytes a weight, 5 GB for a 1.5B model
        tensors = [make(**{**t, "u": nq1.unpack_signs(t["u"]["bits"], t["u"]["cols"], np.int8),
                           "v": nq1.unpack_signs(t["v"]["bits"], t["v"]["cols"], np.int8)})
                   for t in payload["tensors"]]
        return tensors, payload["reports"]


# the modules whose classes (layer reports, layer statistics) work folders of the package's earlier flat layout pickled
_MOVED_MODULES = {"nanoquant.convert": "nanoquant.convert.blocks", "nanoquant.calibration": "nanoquant.convert.calibration"}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return super().find_class(_MOVED_MODULES.get(module, module), name)


def _load(path: Path):
    """A checkpoint file (our own: full unpickling), classes of moved modules found where they are now."""
    return torch.load(path, weights_only=False, pickle_module=SimpleNamespace(Unpickler=_Unpickler, load=pickle.load,
                                                                              __name__="pickle"))


def _layers_payload(layers: dict[str, tuple[LowRankBinary, torch.Tensor | None]], reports: list) -> dict:
    return {"layers": {name: {"u": _pack(layer.u), "v": _pack(layer.v), "s_pre": _host(layer.s_pre),
                              "s_post": _host(layer.s_post), "s_mid": _host(layer.s_mid), "bias": _host(bias)}
                       for name, (layer, bias) in layers.items()},
            "reports": reports}


def _layers_from(payload: dict) -> tuple[dict[str, tuple[LowRankBinary, torch.Tensor | None]], list]:
    layers = {}
    for name, t in payload["layers"].items():
        u, v = _unpack(t["u"]), _unpack(t["v"])
        layers[name] = (LowRankBinary(u=u, v=v, s_pre=t["s_pre"], s_post=t["s_post"], u_latent=u, v_latent=v,
                                      s_mid=t["s_mid"]), t["bias"])
    return layers, payload["reports"]


def file_identity(path: Path) -> dict:
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def as_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): as_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_jsonable(v) for v in obj]
    if isinstance(obj, (Path, np.generic)):
        return str(obj)
    return obj


def work_identity(model_path: Path, settings: ConvertSettings) -> dict:
    """What a work folder belongs to: the source files and every setting that changes what it holds. Distillation
    (model reconstruction) runs after the last checkpoint, so its settings are left out: a kept work folder can be
    resumed with other distillation settings, on another device, and written with other tensor types."""
    files = sorted(p for p in model_path.iterdir() if p.is_file()) if model_path.is_dir() else [model_path]
    checkpointed = asdict(replace(settings, distill=DistillSettings(), device=DEVICE_AUTO))
    for name in ("matmul", *WRITE_ONLY):  # the machine's speed, and how the file is written: not what is kept
        checkpointed.pop(name)
    return {"source": [file_identity(f) for f in files], "settings": as_jsonable(checkpointed),
            "torch_threads": torch.get_num_threads(), "format_version": nq1.FORMAT_VERSION}
