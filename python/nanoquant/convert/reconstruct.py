"""Block reconstruction (method spec section 3.5 steps 1 and 3): tune a decoder block against the full-precision
model's block outputs while its linear layers are factorised one by one.

Step 1 (error-propagation mitigation) trains the still-dense linears of the block; step 3 trains the layer just
factorised through a straight-through sign (latents) and multiplicative scales. Targets are the FP block applied to
the FP stream; inputs are the quantised stream, so a block also learns to undo upstream error.
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint

from nanoquant.convert.admm import LowRankBinary, autocast_for, lowrank_binary_product, sign


@dataclass(frozen=True)
class TuneSettings:
    dense_steps: int = 0          # step 1: Adam steps on the remaining dense weights before each factorisation
    dense_lr: float = 1e-4
    factor_steps: int = 0         # step 3: Adam steps on the layer just factorised
    latent_lr: float = 3e-2       # relative to the layer's mean |latent|, so it means the same for every layer
    scale_lr: float = 5e-3        # on the multiplicative scale offsets s = s0 (1 + delta)
    batch_windows: int = 4
    scope: str = "block"          # "block": paper Algorithm 1, one tuning per block; "layer": per linear (reference)
    loss: str = "absolute"        # a token's output error as is, or against its target's mean square ("relative")

    @property
    def enabled(self) -> bool:
        return self.dense_steps > 0 or self.factor_steps > 0


class StraightThroughSign(torch.autograd.Function):
    """sign(z) forward (sign(0) = +1), identity backward: the pure STE of the method."""

    @staticmethod
    def forward(ctx, z):
        return sign(z)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScaleOffsets(torch.nn.Module):
    """The multiplicative scales of a factorised layer, s = s0 (1 + offset): s_pre, s_post and, where the layer has
    one, s_mid. Offsets start at zero, so one learning rate means the same for every layer."""

    def _init_scales(self, layer: LowRankBinary, trainable: bool) -> None:
        self.register_buffer("s_pre0", layer.s_pre.clone())
        self.register_buffer("s_post0", layer.s_post.clone())
        self.register_buffer("s_mid0", None if layer.s_mid is None else layer.s_mid.clone())
        offset = lambda s: torch.nn.Parameter(torch.zeros_like(s), requires_grad=trainable)  # noqa: E731
        self.pre_offset, self.post_offset = offset(layer.s_pre), offset(layer.s_post)
        self.mid_offset = None if layer.s_mid is None else offset(layer.s_mid)

    def scale_offsets(self) -> list[torch.nn.Parameter]:
        return [p for p in (self.pre_offset, self.mid_offset, self.post_offset) if p is not None]

    def scales(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """s_pre, s_mid (None where the layer has none), s_post."""
        s_mid = None if self.s_mid0 is None else self.s_mid0 * (1 + self.mid_offset)
        return self.s_pre0 * (1 + self.pre_offset), s_mid, self.s_post0 * (1 + self.post_offset)


class TrainableLowRankBinary(_ScaleOffsets):
    """A factorised layer during step 3: latents under a straight-through sign and multiplicative scales."""

    def __init__(self, layer: LowRankBinary, bias: torch.Tensor | None):
        super().__init__()
        # the latents carry ADMM's consensus magnitudes with the signs of the exported factors
        self.u_latent = torch.nn.Parameter(layer.u_latent.abs().clamp_min(1e-12) * layer.u)
        self.v_latent = torch.nn.Parameter(layer.v_latent.abs().clamp_min(1e-12) * layer.v)
        self._init_scales(layer, trainable=True)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_binary_product(x, StraightThroughSign.apply(self.u_latent),
                                      StraightThroughSign.apply(self.v_latent), *self.scales(), self.bias)

    @torch.no_grad()
    def finalize(self) -> LowRankBinary:
        s_pre, s_mid, s_post = (None if s is None else s.clone() for s in self.scales())
        return LowRankBinary(u=sign(self.u_latent), v=sign(self.v_latent), s_pre=s_pre, s_post=s_post,
                             u_latent=self.u_latent.detach().clone(), v_latent=self.v_latent.detach().clone(),
                             s_mid=s_mid)


class FrozenLowRankBinary(_ScaleOffsets):
    """A finished layer: y = s_post * (U (s_mid * (V (s_pre * x)))) + bias, signs fixed (held as int8, a quarter of
    float32); the multiplicative scale offsets stay trainable parameters for model reconstruction (frozen unless a
    caller enables their gradients)."""

    def __init__(self, layer: LowRankBinary, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("u", layer.u.to(torch.int8))
        self.register_buffer("v", layer.v.to(torch.int8))
        self._init_scales(layer, trainable=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x):
        return lowrank_binary_product(x, self.u, self.v, *self.scales(), self.bias)

    @torch.no_grad()
    def layer(self) -> LowRankBinary:
        """The finished layer for writing. Its signs are the int8 buffers themselves: float copies of every layer's
        signs, as the writer once took, are 4 bytes a weight (26 GB for a 7B model)."""
        s_pre, s_mid, s_post = self.scales()
        return LowRankBinary(u=self.u, v=self.v, s_pre=s_pre, s_post=s_post, u_latent=self.u, v_latent=self.v,
                             s_mid=s_mid)


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 0
    lr: float = 1e-2  # on the multiplicative scale offsets
    recompute: str = "auto"  # on / off / auto: recompute each block's activations in the backward (see below)


# "auto" recomputes when a window's saved activations through all blocks would pass this: measured on a Llama-2-7B
# shape at 512 tokens, 266 MiB a block (8.3 GiB for 32) without recomputation, for ~30% more time a step
RECOMPUTE_ABOVE_BYTES = 2 * 2**30


def saved_activation_bytes(block, x: torch.Tensor, kwargs: dict) -> int:
    """Bytes a backward through this block would keep from its forward on x, measured by running it once with
    its scale offsets trainable (int8 signs and the offsets themselves are held anyway and not counted)."""
    held = {id(t) for t in (*block.parameters(), *block.buffers())}
    total = 0

    def count(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.is_floating_point() and id(t) not in held:
            total += t.numel() * t.element_size()
        return t

    with (trainable_scale_offsets(block), torch.enable_grad(),
          torch.autograd.graph.saved_tensors_hooks(count, lambda t: t)):
        run_block(block, x, kwargs)
    return total


@contextmanager
def recomputed_in_backward(blocks):
    """Each block keeps only its input for the backward and runs its forward again there (activation
    checkpointing): distillation then holds one block's activations instead of all of them, which for a 7B model
    is the difference between fitting in 24 GiB or not. In eval mode the recomputation is exact."""
    for block in blocks:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the class's forward again


def logits_from_hidden(model, hidden: torch.Tensor, head: torch.nn.Module | None = None) -> torch.Tensor:
    """The model's logits from its last decoder block's output: final norm, head (`head` in place of the model's
    own, where given), and a final soft-cap if the family has one. The norm is never quantised; the head is only
    with --nq-head, and then the teacher's logits take the dense head as `head`."""
    logits = (head or model.lm_head)(model.model.norm(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


@dataclass
class DistillResult:
    # each step's KL on its own random window (training noise: windows differ in KL)
    losses: list[float] = field(default_factory=list)
    kl_before: float = 0.0    # mean KL on the same fixed windows before and after the steps
    kl_after: float = 0.0
    reverted: bool = False    # the steps raised the fixed windows' KL, so the scales went back to where they were


def _forward_kl(student, teacher_hidden: torch.Tensor, window: torch.Tensor,
                teacher_head: torch.nn.Module | None = None) -> torch.Tensor:
    """KL(teacher || student) at T = 1 on one window, averaged over its tokens."""
    with torch.no_grad():
        log_p = torch.log_softmax(logits_from_hidden(student, teacher_hidden, teacher_head).float(), -1)
    log_q = torch.log_softmax(student(input_ids=window[None], use_cache=False).logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def fixed_windows_kl(student, teacher_hidden: torch.Tensor, windows: torch.Tensor, fixed: torch.Tensor,
                     teacher_head: torch.nn.Module | None = None) -> float:
    with torch.no_grad():
        return sum(float(_forward_kl(student, teacher_hidden[i:i + 1], windows[i], teacher_head))
                   for i in fixed.tolist()) / len(fixed)


def distill_scales(student, teacher_hidden: torch.Tensor, windows: torch.Tensor, settings: DistillSettings,
                   recompute: bool = False, seed: int = 0, fixed: torch.Tensor | None = None,
                   teacher_head: torch.nn.Module | None = None, matmul: str = "float32") -> DistillResult:
    """Model reconstruction: train every FrozenLowRankBinary's scale offsets by forward KL(teacher || student) at
    T = 1. The teacher's logits come from its last-block outputs on the same windows (the full-precision stream of
    block reconstruction), one window at a time, so neither a teacher model nor N x L x vocab logits are held.
    recompute: see recomputed_in_backward. fixed: window indices whose KL is read before and after; where the steps
    did not lower it, the scales are put back (one unlucky run must not leave the model worse than it found it).
    teacher_head: the dense head, where the student's is a NanoQuant layer (--nq-head). matmul: the training steps'
    products (autocast_for); the fixed windows' KL, which decides the revert, is read in float32."""
    if settings.steps <= 0:
        return DistillResult()
    gen = torch.Generator().manual_seed(seed)
    result = DistillResult()
    with trainable_scale_offsets(student) as offsets, recomputed_in_backward(student.model.layers if recompute else []):
        if fixed is not None:
            result.kl_before = fixed_windows_kl(student, teacher_hidden, windows, fixed, teacher_head)
            start = [p.detach().clone() for p in offsets]
        opt = torch.optim.Adam(offsets, lr=settings.lr, betas=(0.9, 0.99))
        for step in range(settings.steps):
            opt.param_groups[0]["lr"] = _cosine(step, settings.steps, settings.lr)
            i = int(torch.randint(0, windows.shape[0], (1,), generator=gen))
            with autocast_for(windows.device, matmul):
                loss = _forward_kl(student, teacher_hidden[i:i + 1], windows[i], teacher_head)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            result.losses.append(float(loss.detach()))
        if fixed is not None:
            result.kl_after = fixed_windows_kl(student, teacher_hidden, windows, fixed, teacher_head)
            if result.kl_after >= result.kl_before:
                with torch.no_grad():
                    for p, value in zip(offsets, start):
                        p.copy_(value)
                result.reverted = True
    return result


@contextmanager
def trainable_scale_offsets(model):
    """The scale offsets of every FrozenLowRankBinary in model, trainable inside the block and frozen again after."""
    offsets = [p for m in model.modules() if isinstance(m, FrozenLowRankBinary) for p in m.scale_offsets()]
    for p in offsets:
        p.requires_grad_(True)
    try:
        yield offsets
    finally:
        for p in offsets:
            p.requires_grad_(False)


@dataclass
class BlockData:
    """Calibration activations at one block boundary and the keyword arguments each decoder layer is called with
    (masks and rotary tables differ between layers in families with local and global attention)."""
    fp: torch.Tensor          # N x L x h, input of this block along the full-precision model
    quantized: torch.Tensor   # N x L x h, input of this block along the partly quantised model
    layer_kwargs: list[dict]
    index: int = 0            # the block these streams enter

    @property
    def kwargs(self) -> dict:
        return self.layer_kwargs[self.index]


class _Stop(Exception):
    pass


class _Recorder(torch.nn.Module):
    """Stands in for a decoder block: records its input and call arguments, passes the input on unchanged."""

    def __init__(self, index: int, n_layers: int, sink: dict):
        super().__init__()
        self.index, self.n_layers, self.sink = index, n_layers, sink

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.setdefault("kwargs", {})[self.index] = kwargs
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        if self.index == self.n_layers - 1:
            raise _Stop  # the head is not needed
        return hidden_states


@torch.no_grad()
def capture_block_inputs(model, windows: torch.Tensor) -> BlockData:
    """The first block's inputs for every window and every block's call arguments, without running any block
    (so it works when the blocks' weights are not loaded)."""
    layers = model.model.layers
    sink: dict = {}
    model.model.layers = torch.nn.ModuleList(_Recorder(i, len(layers), sink) for i in range(len(layers)))
    hidden = []
    try:
        for window in windows:
            try:
                model(input_ids=window[None], use_cache=False)
            except _Stop:
                pass
            hidden.append(sink["hidden"][0].clone())
    finally:
        model.model.layers = layers
    layer_kwargs = []
    for i in range(len(layers)):
        kwargs = {k: v for k, v in sink["kwargs"][i].items() if k not in ("past_key_values", "hidden_states")}
        kwargs["use_cache"] = False
        layer_kwargs.append(kwargs)
    x = torch.stack(hidden)
    return BlockData(fp=x, quantized=x.clone(), layer_kwargs=layer_kwargs)


def run_block(block, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block_batched(block, xs: torch.Tensor, kwargs: dict) -> torch.Tensor:
    return torch.cat([run_block(block, xs[i:i + 1], kwargs) for i in range(xs.shape[0])])


def _cosine(step: int, total: int, lr: float) -> float:
    floor = 1e-4 * lr
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * step / max(1, total)))


BLOCK_LOSSES = ("absolute", "relative")


@dataclass(frozen=True)
class BlockLoss:
    """The block reconstruction loss: each token's squared output error, its channels weighted by the output's
    sensitivity and, if `relative`, divided by the mean square of the token's target.

    Why relative: LLMs grow a few massive activations in the residual stream (SmolLM2 from block 11 on: token 0's
    norm 24,000 against a median of 130-700, 70-98% of the stream's energy), and an absolute loss then spends the
    tuning on that one token's error, which the RMSNorm in front of every consumer of the stream divides by the same
    norm. Relative, each token counts by the error its consumers see. Measured on SmolLM2 at 1.0 bpw it is a wash
    (README, "ablation 1.0: relative block loss"), so absolute, the method's loss, stays the default."""
    channel_weights: torch.Tensor
    relative: bool = False

    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        err = (((out - target) ** 2) * self.channel_weights).sum(-1)
        if self.relative:
            err = err / target.pow(2).mean(-1).clamp_min(1e-30)
        return err.mean()


@torch.no_grad()
def block_loss(block, data: BlockData, target: torch.Tensor, loss: BlockLoss, windows: torch.Tensor) -> float:
    """The tuning loss on the given windows: read before and after tuning on the same windows, the difference is
    what tuning did (a random batch each time would mostly show which windows were drawn)."""
    out = run_block_batched(block, data.quantized[windows], data.kwargs)
    return float(loss(out, target[windows]))


def tune_block(block, params: list[dict], data: BlockData, target: torch.Tensor, loss_fn: BlockLoss,
               steps: int, seed: int, batch_windows: int, matmul: str = "float32") -> tuple[float, float]:
    """Adam with a cosine schedule on the block loss; returns the first and last batch loss. matmul: the steps'
    products (autocast_for; the loss itself is float32)."""
    if steps <= 0 or not params:
        return float("nan"), float("nan")
    opt = torch.optim.Adam(params, betas=(0.9, 0.99), eps=1e-8)
    base_lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(seed)
    n = data.quantized.shape[0]
    losses = []
    for step in range(steps):
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = _cosine(step, steps, lr)
        idx = torch.randint(0, n, (min(batch_windows, n),), generator=gen)
        with autocast_for(target.device, matmul):
            out = run_block(block, data.quantized[idx], data.kwargs)
        loss = loss_fn(out.float(), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses[0], losses[-1]


def distill_recompute(setting: str, blocks, data: BlockData) -> bool:
    """Whether distillation recomputes block activations in its backward: always, never, or ("auto") when a
    window's activations through all blocks, measured on the first block, pass RECOMPUTE_ABOVE_BYTES."""
    saved = len(blocks) * saved_activation_bytes(blocks[0], data.fp[:1], data.layer_kwargs[0])
    recompute = setting == "on" or (setting == "auto" and saved > RECOMPUTE_ABOVE_BYTES)
    print(f"scale distillation: a window's activations through all blocks take {saved / 2**30:.2f} GiB; "
          f"{'recomputed in the backward' if recompute else 'kept for the backward'} (--distill-recompute {setting})")
    return recompute
