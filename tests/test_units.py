"""Shared-input units (--shared-v): q, k and v factorised as one stacked layer, stored as llama.cpp's fused tensor.
The end-to-end check (llama.cpp against the reference forward on tiny mistral and gemma3 models) is in
test_tiny_models.py; these check the pieces."""
import torch

from nanoquant.convert.admm import LowRankBinary, sign
from nanoquant.convert.architectures import architecture_for, gguf_base_name
from nanoquant.convert.calibration import LinearStats
from nanoquant.convert.reconstruct import FrozenLowRankBinary, trainable_scale_offsets
from nanoquant.convert.units import (RowSlice, install_unit, member_names, unit_module, unit_preconditioners,
                                     unit_rows, unit_weight)

QKV = "model.layers.0.self_attn.qkv_proj"


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(64, n, bias=False) for n in (96, 32, 32))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        block = torch.nn.Module()
        block.self_attn = Attention()
        self.model.layers = torch.nn.ModuleList([block])


def test_the_unit_takes_the_place_of_its_first_member_in_the_method_order():
    arch = architecture_for("llama")
    assert arch.units("none") == arch.linears
    assert arch.units("qkv") == ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                 "mlp.down_proj")
    assert gguf_base_name(arch, 30, "model.layers.7.self_attn.qkv_proj") == "blk.7.attn_qkv"
    assert member_names(QKV) == tuple(f"model.layers.0.self_attn.{m}_proj" for m in "qkv")


def test_members_share_one_installed_layer_whose_scales_train_once():
    torch.manual_seed(0)
    model = Tiny()
    weight = unit_weight(model, QKV)
    assert weight.shape == (160, 64) and unit_rows(model, QKV) == [96, 32, 32]
    layer = LowRankBinary(u=sign(torch.randn(160, 32)), v=sign(torch.randn(32, 64)), s_pre=torch.rand(64) + 0.5,
                          s_post=torch.rand(160) + 0.5, u_latent=None, v_latent=None)
    frozen = FrozenLowRankBinary(layer, None)
    install_unit(model, QKV, frozen)
    attn = model.model.layers[0].self_attn
    assert all(isinstance(m, RowSlice) and m.unit is frozen for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert unit_module(model, QKV) is frozen and unit_rows(model, QKV) == [96, 32, 32]
    x = torch.randn(3, 64)
    full = layer.dense() @ x.T
    torch.testing.assert_close(torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1), full.T, rtol=1e-4,
                               atol=1e-4)  # float32 sums in another order
    with trainable_scale_offsets(model) as offsets:
        assert len(offsets) == 2  # s_pre and s_post of the one shared layer, not three copies


def test_each_member_counts_by_its_size_whatever_its_gradient_scale():
    torch.manual_seed(0)
    weight = torch.randn(160, 64)
    stats = {}
    for name, rows, grad_scale in zip(member_names(QKV), (96, 32, 32), (1e-6, 1.0, 1e3)):
        stats[name] = LinearStats(input_moment=torch.rand(64) + 0.1, output_moment=grad_scale * (torch.rand(rows) + 0.1))
    pre_in, pre_out = unit_preconditioners(stats, QKV, 0.2, weight)
    weighted = pre_out[:, None] * weight * pre_in[None, :]
    shares = [float(weighted[a:b].square().sum()) for a, b in ((0, 96), (96, 128), (128, 160))]
    total = sum(shares)
    assert [round(s / total, 4) for s in shares] == [0.6, 0.2, 0.2]
    torch.testing.assert_close(pre_in, stats[member_names(QKV)[0]].preconditioners(0.2)[0])
