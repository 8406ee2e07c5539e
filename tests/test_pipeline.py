"""The method's stages on small inputs: ADMM export keeps the scale right, and block tuning lowers the block loss."""
import copy

import pytest
import torch

from nanoquant.convert.admm import AdmmSettings, factorize, relative_error
from nanoquant.convert.reconstruct import (BlockLoss, FrozenLowRankBinary, TrainableLowRankBinary, distill_scales,
                                           DistillSettings, fixed_windows_kl, recomputed_in_backward,
                                           saved_activation_bytes, trainable_scale_offsets, logits_from_hidden,
                                           run_block_batched, tune_block)


def test_admm_export_scale_is_right_even_with_few_iterations():
    torch.manual_seed(0)
    weight = torch.randn(192, 576)
    d_in, d_out = torch.rand(576) + 0.5, torch.rand(192) + 0.5
    layer = factorize(weight, 64, d_in, d_out, AdmmSettings(iterations=5))
    weighted = relative_error(d_out[:, None] * weight * d_in[None, :], d_out[:, None] * layer.dense() * d_in[None, :])
    assert weighted < 1.0, weighted  # a zero approximation scores 1.0
    assert set(layer.u.unique().tolist()) <= {-1.0, 1.0} and layer.v.shape == (64, 576)


def _tiny_llama(n_layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, vocab_size=256, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def _block_data(model, windows):
    from nanoquant.convert.reconstruct import capture_block_inputs
    return capture_block_inputs(model, windows)


def test_factor_tuning_lowers_the_block_loss():
    model = _tiny_llama()
    windows = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    data = _block_data(model, windows)
    block = model.model.layers[0]
    target = run_block_batched(copy.deepcopy(block), data.fp, data.kwargs)
    dense = block.mlp.down_proj
    layer = factorize(dense.weight, 32, torch.ones(128), torch.ones(64), AdmmSettings(iterations=10))
    trainable = TrainableLowRankBinary(layer, None)
    block.mlp.down_proj = trainable
    weights = torch.ones(64)
    with torch.no_grad():
        before = float((((run_block_batched(block, data.quantized, data.kwargs) - target) ** 2) * weights).sum(-1).mean())
    groups = [{"params": [trainable.u_latent, trainable.v_latent], "lr": 1e-3},
              {"params": [trainable.pre_offset, trainable.post_offset], "lr": 1e-2}]
    tune_block(block, groups, data, target, BlockLoss(weights), steps=30, seed=0, batch_windows=4)
    with torch.no_grad():
        after = float((((run_block_batched(block, data.quantized, data.kwargs) - target) ** 2) * weights).sum(-1).mean())
    assert after < before, (before, after)
    final = trainable.finalize()
    assert set(final.u.unique().tolist()) <= {-1.0, 1.0}


def _last_block_outputs(model, windows):
    outputs = []
    handle = model.model.layers[-1].register_forward_hook(
        lambda m, args, out: outputs.append((out[0] if isinstance(out, tuple) else out).detach()))
    with torch.no_grad():
        logits = torch.cat([model(input_ids=w[None], use_cache=False).logits for w in windows])
    handle.remove()
    return torch.cat(outputs), logits


def test_teacher_logits_from_the_fp_stream_are_the_models_logits():
    model = _tiny_llama()
    windows = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3))
    hidden, logits = _last_block_outputs(model, windows)
    with torch.no_grad():
        assert torch.allclose(logits_from_hidden(model, hidden), logits, atol=1e-5)


def test_scale_distillation_lowers_the_kl():
    teacher = _tiny_llama()
    student = copy.deepcopy(teacher)
    for name in ("q_proj", "o_proj"):
        dense = getattr(student.model.layers[0].self_attn, name)
        layer = factorize(dense.weight, 32, torch.ones(64), torch.ones(64), AdmmSettings(iterations=10))
        setattr(student.model.layers[0].self_attn, name, FrozenLowRankBinary(layer, None))
    windows = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))
    teacher_hidden, _ = _last_block_outputs(teacher, windows)
    result = distill_scales(student, teacher_hidden, windows, DistillSettings(steps=40, lr=1e-2),
                            fixed=torch.arange(2))
    losses = result.losses
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert result.kl_after < result.kl_before and not result.reverted


def test_distillation_that_raises_the_kl_puts_the_scales_back():
    teacher = _tiny_llama()
    windows = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))
    teacher_hidden, _ = _last_block_outputs(teacher, windows)
    student = _student_with_factorised_attention(teacher)
    scales = lambda: [p.detach().clone() for p in student.parameters() if p.dtype.is_floating_point]  # noqa: E731
    before = scales()
    result = distill_scales(student, teacher_hidden, windows, DistillSettings(steps=3, lr=50.0),
                            fixed=torch.arange(2))
    assert result.kl_after > result.kl_before and result.reverted
    assert all(torch.equal(a, b) for a, b in zip(scales(), before))
    assert fixed_windows_kl(student, teacher_hidden, windows, torch.arange(2)) == result.kl_before


def _student_with_factorised_attention(teacher):
    student = copy.deepcopy(teacher)
    for block in student.model.layers:
        for name in ("q_proj", "o_proj"):
            dense = getattr(block.self_attn, name)
            layer = factorize(dense.weight, 32, torch.ones(64), torch.ones(64), AdmmSettings(iterations=10))
            setattr(block.self_attn, name, FrozenLowRankBinary(layer, None))
    return student


def test_distillation_with_recomputed_activations_is_exact_and_keeps_less():
    teacher = _tiny_llama(n_layers=3)
    windows = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))
    teacher_hidden, _ = _last_block_outputs(teacher, windows)
    runs = {}
    for recompute in (False, True):
        student = _student_with_factorised_attention(teacher)
        losses = distill_scales(student, teacher_hidden, windows, DistillSettings(steps=5, lr=1e-2), recompute).losses
        runs[recompute] = losses, [p.detach().clone() for p in student.parameters() if p.dtype.is_floating_point]
        assert all("forward" not in vars(block) for block in student.model.layers)  # the class's forward again
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[True][1], runs[False][1]))

    def saved_bytes(recompute: bool) -> int:
        total = []
        with trainable_scale_offsets(student), recomputed_in_backward(student.model.layers if recompute else []):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t,
                                                          lambda t: t):
                student(input_ids=windows[:1], use_cache=False)
        return sum(total)

    # recomputation keeps a block's input where the plain backward keeps all its activations
    per_block = saved_activation_bytes(student.model.layers[0], teacher_hidden[:1],
                                       _block_data(student, windows[:1]).kwargs)
    assert saved_bytes(False) - saved_bytes(True) > 0.8 * len(student.model.layers) * per_block > 0


def test_frozen_layer_backward_keeps_int8_signs_and_matches_the_float_product():
    from nanoquant.convert.admm import lowrank_binary_product

    torch.manual_seed(0)
    layer = factorize(torch.randn(96, 64), 32, torch.ones(64), torch.ones(96), AdmmSettings(iterations=3))
    frozen = FrozenLowRankBinary(layer, torch.randn(96))
    frozen.pre_offset.requires_grad_(True)
    frozen.post_offset.requires_grad_(True)
    x = torch.randn(5, 64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = frozen(x)
    # no float tensor as large as a sign matrix is kept for the backward: only the int8 signs themselves
    big = [t for t in saved if t.numel() >= 32 * 64]
    assert big and all(t.dtype == torch.int8 for t in big), [(t.dtype, tuple(t.shape)) for t in big]
    y.square().sum().backward()
    pre = frozen.pre_offset.detach().clone().requires_grad_(True)
    post = frozen.post_offset.detach().clone().requires_grad_(True)
    y_float = lowrank_binary_product(x, frozen.u.float(), frozen.v.float(), frozen.s_pre0 * (1 + pre), None,
                                     frozen.s_post0 * (1 + post), frozen.bias)
    y_float.square().sum().backward()
    assert torch.equal(y, y_float)
    assert torch.allclose(frozen.pre_offset.grad, pre.grad) and torch.allclose(frozen.post_offset.grad, post.grad)


def test_rank_bound_steps_follow_the_cost_of_the_ranks():
    """Presets are sized for 1.0 bpw; below it ADMM and STE get steps (those the user did not set) in inverse
    proportion to the ranks' per-token cost, at most MAX_STEP_GROWTH times as many, so the time stays about that of
    1.0 bpw; above it they keep the preset's counts (more bits never get less optimisation)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from nanoquant.fileformat import nq1
    from nanoquant.convert.architectures import architecture_for
    from nanoquant.convert.blocks import MAX_STEP_GROWTH, rank_scaled_settings
    from nanoquant.convert.pipeline import build_parser
    from nanoquant.convert.settings import PRESETS, settings_from_args

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    with torch.device("meta"):
        block = LlamaDecoderLayer(config, 0)
    arch = architecture_for("llama")
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    cost = lambda bpw: sum(nq1.rank_for_bpw(o, i, bpw) * (o + i) for o, i in shapes)  # noqa: E731
    ratio = cost(1.0) / cost(2.0)
    assert 0.45 < ratio < 0.5  # no rank capped at min(m, n) any more

    steps = lambda s: (s.admm.iterations, s.tune.factor_steps, s.distill.steps)  # noqa: E731

    def settings(*args):
        return rank_scaled_settings(settings_from_args(build_parser().parse_args(["m.gguf", "--outfile", "o.gguf",
                                                                                    *args])), block, arch)
    s = settings("--bpw", "2.0", "--preset", "standard", "--factor-steps", "100")
    standard = PRESETS["standard"]
    assert s.admm.iterations == standard.admm.iterations  # not round(... * ratio): never fewer at more bits
    for preset in ("fast", "standard"):
        more = [steps(settings("--bpw", str(bpw), "--preset", preset)) for bpw in (0.55, 1.0, 1.5, 2.0)]
        assert all(a[:2] >= b[:2] for a, b in zip(more, more[1:])), more  # never rising as bits fall
        assert more[-1] == steps(PRESETS[preset])
    assert s.distill.steps == standard.distill.steps  # a distillation step runs the whole model: not rank-bound
    assert s.tune.factor_steps == 100 and s.tune.dense_steps == 20  # set by the user; not rank-bound
    as_sized = steps(standard)
    assert steps(settings("--bpw", "1.0", "--preset", "standard")) == as_sized
    low = settings("--bpw", "0.55", "--preset", "standard")  # ranks at 0.55 cost about half: up to twice the steps
    up = cost(1.0) / cost(0.55)
    assert 1.8 < up and steps(low) == (round(standard.admm.iterations * min(up, MAX_STEP_GROWTH)),
                                       round(standard.tune.factor_steps * min(up, MAX_STEP_GROWTH)),
                                       standard.distill.steps)
    tiny = settings("--bpw", "0.1", "--preset", "standard")  # growth stops at MAX_STEP_GROWTH
    assert steps(tiny)[:2] == (standard.admm.iterations * MAX_STEP_GROWTH, standard.tune.factor_steps * MAX_STEP_GROWTH)
    assert steps(settings("--bpw", "2.0", "--preset", "paper")) == (400, 1024, 1024)  # the paper's, as given


def test_per_rank_scales_only_lower_the_preconditioned_error():
    # same seed, same ADMM run, same signs: the s_mid least squares contains the global factor's solution
    torch.manual_seed(0)
    weight = torch.randn(96, 320) * torch.rand(320)
    d_in, d_out = torch.rand(320) + 0.5, torch.rand(96) + 0.5
    target = d_out[:, None] * weight * d_in[None, :]
    errors = {}
    for mid in (False, True):
        layer = factorize(weight, 64, d_in, d_out, AdmmSettings(iterations=10), mid_scale=mid)
        assert (layer.s_mid is not None) == mid
        errors[mid] = relative_error(target, d_out[:, None] * layer.dense() * d_in[None, :])
    assert errors[True] < errors[False], errors
    for tall in (False, True):  # both orientations of ADMM give s_mid on the rank axis
        w = weight.T if tall else weight
        layer = factorize(w, 32, torch.ones(w.shape[1]), torch.ones(w.shape[0]), AdmmSettings(iterations=5),
                          mid_scale=True)
        assert layer.s_mid.shape == (32,) and layer.dense().shape == w.shape


def test_scale_offsets_include_s_mid_for_tuning_and_distillation():
    torch.manual_seed(0)
    layer = factorize(torch.randn(64, 96), 32, torch.ones(96), torch.ones(64), AdmmSettings(iterations=5),
                      mid_scale=True)
    x = torch.randn(5, 96)
    for module in (TrainableLowRankBinary(layer, None), FrozenLowRankBinary(layer, None)):
        assert len(module.scale_offsets()) == 3
        assert torch.allclose(module(x), x @ layer.dense().T, atol=1e-4)
    frozen = FrozenLowRankBinary(layer, None)
    with torch.no_grad():
        frozen.mid_offset.fill_(0.5)
    assert torch.allclose(frozen.layer().s_mid, layer.s_mid * 1.5)


def test_sign_maps_zero_and_negative_zero_to_plus_one_and_keeps_the_dtype():
    from nanoquant.convert.admm import sign
    x = torch.tensor([-2.0, -0.0, 0.0, 3.0, -1e-30], dtype=torch.float64)
    out = sign(x)
    assert out.dtype == torch.float64 and out.tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0]


def test_auto_recompute_follows_the_measured_activations(monkeypatch, capsys):
    from nanoquant.convert import reconstruct
    model = _student_with_factorised_attention(_tiny_llama(n_layers=2))
    data = _block_data(model, torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(4)))
    assert reconstruct.distill_recompute("auto", model.model.layers, data) is False  # kilobytes, under 2 GiB
    monkeypatch.setattr(reconstruct, "RECOMPUTE_ABOVE_BYTES", 1)
    assert reconstruct.distill_recompute("auto", model.model.layers, data) is True
    assert reconstruct.distill_recompute("off", model.model.layers, data) is False
    assert "recomputed in the backward" in capsys.readouterr().out


def test_relative_block_loss_counts_each_token_by_its_own_scale():
    # two tokens with the same 10% error, one of them a massive activation 1000x the other's norm
    target = torch.tensor([[[1.0, 0.0], [1000.0, 0.0]]])
    out = target * 1.1
    weights = torch.ones(2)
    relative, absolute = BlockLoss(weights, relative=True), BlockLoss(weights)
    # relative: 0.1^2 / (1/2) for each token, whatever its norm; absolute: the massive token is all of it
    assert float(relative(out, target)) == pytest.approx(0.02)
    assert float(absolute(out, target)) == pytest.approx((0.01 + 1e4) / 2)
    halved = BlockLoss(torch.tensor([1.0, 0.5]), relative=True)  # the channel weights still apply
    assert float(halved(torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[1.0, 0.0]]]))) == pytest.approx(1.0)
