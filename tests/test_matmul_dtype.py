"""bfloat16 products (--matmul): ADMM and the statistics pass give what float32 gives, within stated bounds, and "auto"
picks bfloat16 only where the hardware multiplies it natively."""
from __future__ import annotations

import pytest
import torch

from nanoquant.convert import admm
from nanoquant.convert.admm import AdmmSettings, factorize, relative_error, resolve_matmul
from nanoquant.convert.settings import PRESETS, ConvertSettings, TuneSettings, resolved


def test_auto_follows_the_cpu_flags(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(cpuinfo if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    cpu = torch.device("cpu")
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f\n")
    assert resolve_matmul("auto", cpu) == "float32"
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16\n")
    assert resolve_matmul("auto", cpu) == "bfloat16"
    assert resolve_matmul("float32", cpu) == "float32" and resolve_matmul("bfloat16", cpu) == "bfloat16"
    # what a file records is the resolved value, never "auto"
    assert resolved(PRESETS["fast"], cpu).matmul == "bfloat16" and ConvertSettings().matmul == "float32"


@pytest.mark.parametrize("shape,rank", [((256, 96), 64), ((96, 320), 32)])
def test_admm_in_bfloat16_fits_as_well_as_in_float32(shape, rank):
    torch.manual_seed(0)
    weight = torch.randn(*shape) * torch.rand(shape[1]) * 3  # columns of unequal size, as real weights have
    d_in, d_out = torch.rand(shape[1]) + 0.5, torch.rand(shape[0]) + 0.5
    errors = {}
    for dtype in admm.MATMUL_DTYPES:
        layer = factorize(weight, rank, d_in, d_out, AdmmSettings(iterations=30), matmul=dtype)
        assert set(layer.u.unique().tolist()) <= {-1.0, 1.0} and torch.isfinite(layer.s_pre).all()
        errors[dtype] = relative_error(d_out[:, None] * weight * d_in, d_out[:, None] * layer.dense() * d_in)
    assert abs(errors["bfloat16"] - errors["float32"]) < 0.01, errors


def test_statistics_in_bfloat16_are_the_float32_moments(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nanoquant.convert.calibration import HEAD, StatsCollector

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=300))
    model.requires_grad_(False)

    class InMemory:  # the blocks are already in the model
        def load(self, model, i):
            pass

        def release(self, model, i):
            pass

    windows = torch.randint(0, 300, (3, 48))
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "mlp.down_proj")]
    moments = {dtype: StatsCollector(names, dtype).collect(model, InMemory(), windows, tmp_path / dtype)
               for dtype in admm.MATMUL_DTYPES}
    for name in [*names, HEAD]:
        for field in ("input_moment", "output_moment"):
            a, b = (getattr(moments[d][name], field) for d in admm.MATMUL_DTYPES)
            assert ((a - b).norm() / a.norm()) < 0.05, (name, field)


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=300,
                                         initializer_range=0.2))  # peaked: outputs and losses far from zero
    return model.eval().requires_grad_(False)


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def _factorised(model, block_index: int, cls):
    from nanoquant.convert.units import install_unit

    block = model.model.layers[block_index]
    for i, name in enumerate(LINEARS):
        weight = block.get_submodule(name).weight.detach()
        layer = factorize(weight, 32, torch.ones(weight.shape[1]), torch.ones(weight.shape[0]),
                          AdmmSettings(iterations=10), seed=i)
        install_unit(block, name, cls(layer, None))
    return block


def test_ste_tuning_in_bfloat16_lowers_the_block_loss_as_float32_does():
    from nanoquant.convert.blocks import _tuning_groups
    from nanoquant.convert.reconstruct import (BlockLoss, TrainableLowRankBinary, block_loss, capture_block_inputs,
                                               tune_block)
    from nanoquant.convert.reconstruct import run_block_batched

    windows = torch.randint(0, 300, (4, 40), generator=torch.Generator().manual_seed(1))
    results = {}
    for dtype in admm.MATMUL_DTYPES:
        model = _tiny_llama()
        data = capture_block_inputs(model, windows)
        target = run_block_batched(model.model.layers[0], data.fp, data.kwargs)
        block = _factorised(model, 0, TrainableLowRankBinary)
        loss_fn = BlockLoss(torch.ones(64))
        every = torch.arange(4)
        before = block_loss(block, data, target, loss_fn, every)
        params = _tuning_groups([m for m in block.modules() if isinstance(m, TrainableLowRankBinary)], TuneSettings())
        tune_block(block, params, data, target, loss_fn, steps=40, seed=0, batch_windows=2, matmul=dtype)
        results[dtype] = (before, block_loss(block, data, target, loss_fn, every))
    (b32, a32), (b16, a16) = results["float32"], results["bfloat16"]
    assert b32 == pytest.approx(b16, rel=1e-6)  # the same start: only the steps' products differ
    assert a32 < 0.8 * b32 and a16 < 0.8 * b16, results
    assert abs(a16 - a32) / a32 < 0.1, results


def test_distillation_in_bfloat16_lowers_the_kl_as_float32_does():
    from nanoquant.convert.reconstruct import DistillSettings, FrozenLowRankBinary, capture_block_inputs, distill_scales
    from nanoquant.convert.reconstruct import run_block_batched

    windows = torch.randint(0, 300, (4, 40), generator=torch.Generator().manual_seed(2))
    results = {}
    for dtype in admm.MATMUL_DTYPES:
        model = _tiny_llama()
        data = capture_block_inputs(model, windows)
        hidden = data.fp
        for i, layer in enumerate(model.model.layers):  # the teacher's last-block outputs
            data.index = i
            hidden = run_block_batched(layer, hidden, data.kwargs)
        for i in range(2):
            _factorised(model, i, FrozenLowRankBinary)
        result = distill_scales(model, hidden, windows, DistillSettings(steps=30, lr=3e-2), fixed=torch.arange(4),
                                matmul=dtype)
        results[dtype] = (result.kl_before, result.kl_after)
    (b32, a32), (b16, a16) = results["float32"], results["bfloat16"]
    assert b32 == pytest.approx(b16, rel=1e-6)
    assert a32 < 0.9 * b32 and a16 < 0.9 * b16, results
    assert abs(a16 - a32) / a32 < 0.1, results
