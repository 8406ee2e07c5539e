"""Block streaming: a HF folder's blocks are read on demand, and the block-by-block statistics equal a whole-model
forward/backward pass."""
import os

import pytest
import torch

from conftest import make_tiny_model
from nanoquant.convert.architectures import architecture_for
from nanoquant.convert.calibration import StatsCollector
from nanoquant.convert.memory import StagePeaks
from nanoquant.convert.streaming import ResidentBlocks, open_skeleton


def _whole_model_stats(model, names, windows):
    """The plain way: hooks on every linear, model(input_ids, labels=input_ids).loss.backward() per window."""
    collector = StatsCollector(names)
    from nanoquant.convert.calibration import GRAD_SCALE, LinearStats, RobustSecondMoment
    collector.inputs = {n: RobustSecondMoment() for n in names}
    collector.grads = {n: RobustSecondMoment() for n in names}
    handles = []
    for n in names:
        m = model.get_submodule(n)
        handles.append(m.register_forward_hook(lambda mod, a, o, n=n: collector.inputs[n].update(a[0])))
        handles.append(m.register_full_backward_hook(lambda mod, gi, go, n=n: collector.grads[n].update(go[0] * GRAD_SCALE)))
    model.get_input_embeddings().weight.requires_grad_(True)
    for w in windows:
        model(input_ids=w[None], labels=w[None], use_cache=False).loss.backward()
    for h in handles:
        h.remove()
    return {n: LinearStats(collector.inputs[n].value(), collector.grads[n].value() / GRAD_SCALE) for n in names}


def test_streamed_statistics_equal_a_whole_model_pass(tmp_path, smol_tokenizer):
    from transformers import AutoModelForCausalLM
    hf = make_tiny_model("gemma3", tmp_path / "hf", smol_tokenizer, n_layers=6)  # 5 local-attention blocks, then a global one
    arch = architecture_for("gemma3_text")
    names = [f"model.layers.{i}.{linear}" for i in range(6) for linear in arch.linears]
    windows = torch.randint(0, len(smol_tokenizer), (3, 128), generator=torch.Generator().manual_seed(0))

    whole = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval().requires_grad_(False)
    expected = _whole_model_stats(whole, names, windows)

    skeleton, blocks = open_skeleton(hf)
    assert all(p.is_meta for p in skeleton.model.layers.parameters())  # nothing of the blocks is loaded up front
    streamed = StatsCollector(names).collect(skeleton, blocks, windows, tmp_path / "scratch")
    assert all(p.is_meta for p in skeleton.model.layers.parameters())  # and every block was released again
    resident = StatsCollector(names).collect(whole, ResidentBlocks(), windows, tmp_path / "scratch2")
    for n in names:
        for got in (streamed[n], resident[n]):
            assert torch.allclose(got.input_moment, expected[n].input_moment, rtol=1e-4, atol=1e-12), n
            assert torch.allclose(got.output_moment, expected[n].output_moment, rtol=1e-3, atol=1e-20), n


def _gguf_of(hf_dir, out):
    import subprocess
    import sys

    from conftest import REPO
    proc = subprocess.run([sys.executable, str(REPO / "vendor/llama.cpp/convert_hf_to_gguf.py"), str(hf_dir),
                           "--outtype", "q8_0", "--outfile", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3", "smollm2"])
def test_gguf_blocks_equal_transformers_whole_load(kind, tmp_path, smol_tokenizer):
    """A GGUF streams block by block to exactly the weights transformers makes of the whole file (dequantisation,
    q/k row order, norm offsets, tied head)."""
    from transformers import AutoModelForCausalLM

    from conftest import SMOL_GGUF
    from nanoquant.fileformat.info import open_gguf
    from nanoquant.convert.streaming import gguf_config, open_gguf_skeleton

    path = SMOL_GGUF if kind == "smollm2" else _gguf_of(make_tiny_model(kind, tmp_path / "hf", smol_tokenizer),
                                                         tmp_path / f"{kind}.gguf")
    # transformers' own GGUF config drops an explicit head_dim (a wrong qwen3 model): give it the corrected one
    config, _ = gguf_config(path, open_gguf(path))
    whole = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=torch.float32)
    expected = dict(whole.named_parameters())
    skeleton, blocks = open_gguf_skeleton(path)
    assert all(p.is_meta for p in skeleton.model.layers.parameters())
    for name, p in skeleton.named_parameters():
        if not name.startswith("model.layers."):
            assert torch.equal(p, expected[name]), name
    for i in range(len(skeleton.model.layers)):
        blocks.load(skeleton, i)
        for name, p in skeleton.model.layers[i].named_parameters():
            assert torch.equal(p, expected[f"model.layers.{i}.{name}"]), (i, name)
        blocks.release(skeleton, i)
    assert all(p.is_meta for p in skeleton.model.layers.parameters())


def test_skeleton_reads_no_block_tensor_and_keeps_no_file_mapped(tmp_path, smol_tokenizer, monkeypatch):
    import safetensors

    hf = make_tiny_model("llama", tmp_path / "hf", smol_tokenizer)
    read, open_handles = [], []
    real_safe_open = safetensors.safe_open

    class CountingHandle:  # records the tensors read and whether the mapping is still open
        def __init__(self, *args, **kwargs):
            self.inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            open_handles.append(self)
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            open_handles.remove(self)
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", CountingHandle)
    skeleton, blocks = open_skeleton(hf)
    assert read and not any(k.startswith("model.layers.") for k in read), read
    blocks.load(skeleton, 0)
    assert any(k.startswith("model.layers.0.") for k in read) and not open_handles


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_each_stage_reports_its_own_peak_rss():
    """bench/memory.py extrapolates every stage on its own, so a stage's peak must not carry an earlier stage's."""
    peaks = StagePeaks()
    block = bytearray(400 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
    del block  # gone before the stage ends: only the stage's peak remembers it
    first = float(peaks.end_stage().split()[2])
    second = float(peaks.end_stage().split()[2])
    assert first - second > 300, (first, second)
    assert peaks.overall_mib == pytest.approx(first, abs=1)
