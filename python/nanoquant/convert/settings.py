"""The converter's settings: one typed record, the presets as values of it, and one table of command-line options
from which both the parser and the overrides of a preset follow.

A new setting is a field of ConvertSettings (or of one of the stage records it holds) and, if the command line
should reach it, one Option row. The seed is ConvertSettings.seed alone: every stage reads it from there.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import gguf
import torch

from nanoquant.convert.admm import MATMUL_AUTO, MATMUL_DTYPES, AdmmSettings, resolve_matmul
from nanoquant.convert.architectures import SHARED_INPUT_UNITS, SHARED_NONE
from nanoquant.convert.calibration import DEFAULT_CALIBRATION_TEXT
from nanoquant.convert.ranks import ALLOCATIONS, SENSITIVITY, SPREAD_EXPECTED, valid_spread
from nanoquant.convert.reconstruct import BLOCK_LOSSES, RECOMPUTE_ABOVE_BYTES, DistillSettings, TuneSettings

CHAT_AUTO, CHAT_NONE = "auto", "none"
DEVICE_AUTO = "auto"
DEVICES = (DEVICE_AUTO, "cpu", "cuda")


@dataclass(frozen=True)
class ConvertSettings:
    bpw: float = 1.0
    calib_text: Path = DEFAULT_CALIBRATION_TEXT
    calib_windows: int = 32
    calib_window_tokens: int = 512
    # conversations in the model's own chat template: "auto" (the teacher answers DEFAULT_CHAT_INSTRUCTIONS, for a
    # model with a chat template), "none" (raw text only), or a JSONL file of {"messages": [...]} per line
    calib_chat: str = CHAT_AUTO
    chat_share: float = 0.5  # the share of calibration windows that are conversations (when there are any)
    seed: int = 0
    shrinkage: float | None = None  # None: the architecture's value
    admm: AdmmSettings = AdmmSettings()
    tune: TuneSettings = TuneSettings()
    distill: DistillSettings = DistillSettings()
    # how the bits are shared among the layers (ranks.py). Standard preset on SmolLM2, 150-chunk PPL (F32 22.26):
    # sensitivity with spread 2 gave 108.19 at 1.0 bpw and 191.67 at 0.55; uniform 126.00 and 280.98; sensitivity
    # unbounded (spread 0) 121.96 and 310.86
    rank_allocation: str = SENSITIVITY
    rank_spread: float = 2.0  # sensitivity ranks stay within this factor of the uniform rank (0: unbounded)
    mid_scale: bool = False  # a per-rank scale s_mid in every layer, its 32 bits a rank counted in the budget
    shared_v: str = SHARED_NONE  # linears reading one input factorised as one stacked layer (one V); see --shared-v
    # the output head as a NanoQuant layer too, its rank from the same bit budget (a head of its own, not tied to
    # the token embedding, which is a lookup and stays a quantised table)
    nq_head: bool = False
    other_type: str = "Q8_0"
    # the token embedding's and the output head's types; they are the largest tensors besides the NanoQuant layers (a
    # 151,936-token vocabulary at 1,536 wide is 233M weights each), so the whole file's size depends on them as on
    # the bpw. The defaults, by measurement: the embedding Q2_K (llama-quantize's choice in its 1-2-bit mixes), the
    # head Q4_K (None: Q8_0 where 256 does not divide its rows). Qwen2.5-Coder-1.5B at 1.0 bpw (fast preset): 378 MB
    # and PPL 107.78, against 666 MB and 103.73 with both in Q8_0 and 407 MB and 108.05 with llama-quantize's Q5_K
    # head. A type whose blocks do not divide the rows falls back as llama-quantize does
    token_embd_type: str = "Q2_K"
    output_type: str | None = None
    threads: int = 0
    # the dtype of the large products of ADMM and of the statistics pass (admm.factorize, StatsCollector): "auto"
    # is bfloat16 where the hardware multiplies it natively (admm.resolve_matmul), which a file records as resolved
    matmul: str = "float32"
    # where torch computes (statistics, rank allocation, ADMM, block and model reconstruction): "auto" is cuda when
    # torch sees a GPU. Like threads, it is not part of the file's settings record nor of a work folder's identity
    device: str = "auto"
    effort_bpw: float | None = None        # rank_scaled_settings: the bpw the step counts below were sized for
    rank_scaled: tuple[str, ...] = ()      # which of RANK_BOUND_STEPS it may scale (not those set by the user)


# settings that decide only how the file is written, not what the work folder holds: a kept work folder can be written
# again with other types (checkpoint.work_identity leaves them out)
WRITE_ONLY = ("other_type", "token_embd_type", "output_type")


def with_value(settings, path: str, value):
    """A copy of a (nested, frozen) settings record with the field at the dotted `path` set to `value`."""
    head, _, rest = path.partition(".")
    return replace(settings, **{head: with_value(getattr(settings, head), rest, value) if rest else value})


def value_at(settings, path: str):
    for part in path.split("."):
        settings = getattr(settings, part)
    return settings


# Presets, sized for SmolLM2-135M on a 2-core CPU (fast <= 10 min, standard <= 30 min; measured times in the README).
# effort_bpw: the step counts are sized for this bpw; below it the rank-bound stages get more steps in inverse
# proportion to the ranks' cost, so a lower bpw costs about the same time; above it they keep these counts and take
# longer (see blocks.rank_scaled_settings).
PRESETS: dict[str, ConvertSettings] = {
    # fast: ADMM iterations and distillation steps pay most. SmolLM2 at 1.0 bpw, 40-chunk PPL (F32 22.50), Zen 5,
    # 2 cores: ADMM 20 / distill 20: 343 in 399 s; ADMM 20 / distill 40: 306; ADMM 40 / distill 40: 210.5 in 494 s;
    # ADMM 60 / distill 40: 198.3 in 562 s (too close to the 10 minutes). Latent learning rates 0.01 and 0.1 both
    # tuned a block worse than 0.03, and distillation at 5e-3 or 2e-2 did worse than 1e-2. STE 40 steps with the
    # spread-bound ranks (session 24): 150-chunk PPL 179.27 in 625 s, over the 10 minutes; ADMM and distillation were
    # the stages measured to pay most, so the STE steps went to 20
    "fast": ConvertSettings(
        calib_windows=16, calib_window_tokens=512, admm=AdmmSettings(iterations=40), matmul=MATMUL_AUTO,
        tune=TuneSettings(dense_steps=0, factor_steps=20, batch_windows=1, scope="block"),
        distill=DistillSettings(steps=40, lr=1e-2), effort_bpw=1.0),
    # standard: SmolLM2 at 1.0 bpw, 150-chunk PPL (F32 22.26), Zen 5, 2 cores: ADMM 60 / distill 70 (uniform ranks,
    # issue #3's table) 152.3; ADMM 120 / distill 100 (sensitivity ranks) 124.13 in 1,333 s; distill 150 on the same
    # blocks 124.18 (its training KL still fell: 32 windows are learnt, not the text). 64 windows instead of 32 steady
    # the calibration draw: seeds 0 and 1 gave 121.96 / 124.83 (2% apart) where 32 windows gave 124.13 / 155.47 (25%),
    # in 1,703 / 1,775 s
    "standard": ConvertSettings(
        calib_windows=64, calib_window_tokens=512, admm=AdmmSettings(iterations=120), matmul=MATMUL_AUTO,
        tune=TuneSettings(dense_steps=20, factor_steps=100, batch_windows=1, scope="block"),
        distill=DistillSettings(steps=100, lr=1e-2), effort_bpw=1.0),
    # the reference's schedule (spec 3.5/3.6): per-layer tuning, 8 epochs over 128 windows of 2048 tokens
    "paper": ConvertSettings(
        calib_windows=128, calib_window_tokens=2048, admm=AdmmSettings(iterations=400),
        tune=TuneSettings(dense_steps=256, factor_steps=1024, batch_windows=1, scope="layer"),
        distill=DistillSettings(steps=1024, lr=1e-3), effort_bpw=None),
}
DEFAULT_PRESET = "fast"

# the stages whose cost per step grows with the rank: ADMM (m n r per iteration) and STE tuning (r (d_in + d_out) per
# token through each factorised layer). Distillation is not among them: a step runs the whole model, whose attention,
# head and softmax over the vocabulary do not grow with the rank (SmolLM2, measured: 5.0 s a step at 1.0 bpw, 6.3 s at
# 2.0, while the factorised layers cost 1.64x)
RANK_BOUND_STEPS = ("admm.iterations", "tune.factor_steps")


def resolved(settings: ConvertSettings, device: torch.device) -> ConvertSettings:
    """The settings with every "auto" that depends on the machine decided for `device`: what the file records."""
    return replace(settings, matmul=resolve_matmul(settings.matmul, device))


def torch_device(setting: str) -> torch.device:
    """The device a --device setting names; auto: the first CUDA device when torch sees one, else the CPU."""
    if setting == DEVICE_AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected 'on' or 'off', got '{text}'")
    return text == "on"


def _spread(text: str) -> float:
    value = float(text)
    if not valid_spread(value):
        raise argparse.ArgumentTypeError(f"{SPREAD_EXPECTED}, got '{text}'")
    return value


def _ggml_type(text: str) -> str:
    if text.upper() not in gguf.GGMLQuantizationType.__members__:
        raise argparse.ArgumentTypeError(f"unknown ggml type '{text}'")
    return text


@dataclass(frozen=True)
class Option:
    """One command-line option and the settings field it sets; absent from the command line, the preset's value."""
    flag: str
    path: str
    type: Callable[[str], Any]
    help: str
    choices: tuple | None = None
    metavar: str | None = None


OPTIONS: tuple[Option, ...] = (
    Option("--bpw", "bpw", float, "target bits per weight of the decoder linear layers"),
    Option("--calib", "calib_text", Path, "calibration text (default: WikiText-2 validation in data/)",
           metavar="TEXT"),
    Option("--calib-chat", "calib_chat", str,
           "calibration conversations: 'auto' (the teacher answers the instructions in data/chat/, for a model with a "
           "chat template), 'none' (raw text only), or a JSONL file of {\"messages\": [...]} per line", metavar="SRC"),
    Option("--chat-share", "chat_share", float, "share of calibration windows that are conversations"),
    Option("--calib-windows", "calib_windows", int, "number of calibration windows"),
    Option("--calib-window-tokens", "calib_window_tokens", int, "tokens per calibration window"),
    Option("--admm-iterations", "admm.iterations", int, "ADMM outer iterations"),
    Option("--shrinkage", "shrinkage", float, "Hessian-diagonal shrinkage (default: per family)"),
    Option("--dense-steps", "tune.dense_steps", int, "block tuning steps of the still-dense layers"),
    Option("--factor-steps", "tune.factor_steps", int, "STE tuning steps of the factorised layers"),
    Option("--dense-lr", "tune.dense_lr", float, "Adam learning rate of the dense block tuning"),
    Option("--latent-lr", "tune.latent_lr", float, "STE latent learning rate, relative to the mean |latent|"),
    Option("--scale-lr", "tune.scale_lr", float, "STE learning rate on the multiplicative scale offsets"),
    Option("--tune-batch", "tune.batch_windows", int, "windows per tuning step"),
    Option("--tune-scope", "tune.scope", str,
           "block: tune once per block (paper Algorithm 1); layer: per linear (reference code, 7x cost)",
           choices=("block", "layer")),
    Option("--block-loss", "tune.loss", str,
           "block reconstruction loss: each token's squared error as is (default), or relative to its target's "
           "mean square (massive activations then do not dominate it)", choices=BLOCK_LOSSES),
    Option("--distill-steps", "distill.steps", int, "scale-only KL distillation steps (model reconstruction)"),
    Option("--distill-lr", "distill.lr", float, "distillation learning rate on the multiplicative scale offsets"),
    Option("--distill-recompute", "distill.recompute", str,
           "recompute block activations in distillation's backward: less memory, ~30%% more time; auto: when a "
           f"window's activations through all blocks pass {RECOMPUTE_ABOVE_BYTES / 2**30:g} GiB",
           choices=("auto", "on", "off")),
    Option("--rank-allocation", "rank_allocation", str,
           "uniform: the method's rank rule per shape; sensitivity: ranks where they lower the loss most (both at the "
           "same total bits)", choices=ALLOCATIONS),
    Option("--rank-spread", "rank_spread", _spread,
           "sensitivity allocation: each layer's rank within this factor of its uniform rank (0: unbounded)"),
    Option("--mid-scale", "mid_scale", _on_off,
           "a per-rank scale s_mid in every layer (32 bits a rank, within the same bit budget)", metavar="on|off"),
    Option("--shared-v", "shared_v", str,
           "qkv: q, k and v (one input) factorised as one stacked layer, one V for the three and their ranks' bits "
           "pooled, stored as llama.cpp's fused attn_qkv; none: each linear its own factors",
           choices=(SHARED_NONE, *SHARED_INPUT_UNITS)),
    Option("--nq-head", "nq_head", _on_off,
           "the output head as a NanoQuant layer too, its rank from the same bit budget (a model whose head is not "
           "tied to the token embedding); off: the head is quantised to --output-tensor-type", metavar="on|off"),
    Option("--seed", "seed", int, "seed of calibration sampling, ADMM, tuning and distillation"),
    Option("--other-type", "other_type", _ggml_type, "ggml type of the non-NanoQuant tensors (F32, F16, Q8_0, ...)"),
    Option("--token-embedding-type", "token_embd_type", _ggml_type,
           "ggml type of the token embedding (as llama-quantize's option; Q2_K, as in its 1-2-bit mixes)"),
    Option("--output-tensor-type", "output_type", _ggml_type,
           "ggml type of the output head, quantised with the calibration's importance matrix (as llama-quantize's "
           "option; default Q4_K, or Q8_0 where 256 does not divide its rows)"),
    Option("--threads", "threads", int, "torch threads (0: torch's default)"),
    Option("--matmul", "matmul", str,
           "dtype of the large products of the statistics pass, ADMM, STE tuning and distillation: auto (bfloat16 on "
           "a GPU and on a CPU with AVX512-BF16 or AMX), float32 or bfloat16 (losses and accumulation in float32)",
           choices=(MATMUL_AUTO, *MATMUL_DTYPES)),
    Option("--device", "device", str, "where torch computes every stage: auto (cuda when torch sees a GPU), cpu or cuda",
           choices=DEVICES),
)


def _dest(option: Option) -> str:
    return option.flag.lstrip("-").replace("-", "_")


def add_options(parser: argparse.ArgumentParser) -> None:
    """The settings options; each defaults to None, meaning 'the preset's value', which the help shows."""
    fast = PRESETS[DEFAULT_PRESET]
    for option in OPTIONS:
        default = value_at(fast, option.path)
        shown = default.name if isinstance(default, Path) else default
        parser.add_argument(option.flag, dest=_dest(option), type=option.type, choices=option.choices, default=None,
                            metavar=option.metavar, help=f"{option.help} [{DEFAULT_PRESET}: {shown}]")


def settings_from_args(args: argparse.Namespace) -> ConvertSettings:
    """The preset with every option the command line gave; rank-bound step counts the user set are not scaled."""
    settings = PRESETS[args.preset]
    given = {option.path: getattr(args, _dest(option)) for option in OPTIONS if getattr(args, _dest(option)) is not None}
    for path, value in given.items():
        settings = with_value(settings, path, value)
    return replace(settings, rank_scaled=tuple(path for path in RANK_BOUND_STEPS if path not in given))
