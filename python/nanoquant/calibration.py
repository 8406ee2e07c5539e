"""Calibration windows and the Hessian-diagonal statistics (method spec section 3.4)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
DEFAULT_CALIBRATION_TEXT = DATA_DIR / "wikitext-2" / "valid.txt"
GRAD_SCALE = 1e6  # keeps tiny output gradients away from underflow; a constant factor for ADMM and Adam


def calibration_windows(tokenizer, text_path: Path, n_windows: int, window: int, seed: int) -> torch.Tensor:
    """n_windows random windows of `window` tokens from the text, tokenized once (no special tokens)."""
    text = Path(text_path).read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() <= window:
        raise ValueError(f"{text_path}: {ids.numel()} tokens, need more than the window of {window}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - window, (n_windows,), generator=gen)
    return torch.stack([ids[s:s + window] for s in starts.tolist()])


@dataclass
class RobustSecondMoment:
    """Per-channel E[z^2] over tokens with per-token norm clipping at a running robust maximum."""
    quantile: float = 0.999
    total: torch.Tensor | None = None
    gmax: float = 0.0
    samples: int = 0

    def update(self, z: torch.Tensor) -> None:
        z = z.detach().reshape(-1, z.shape[-1]).float()
        norms = z.norm(dim=1)
        k = max(1, int(z.shape[0] * (1.0 - self.quantile)))
        tau = float(torch.topk(norms, k).values[-1])
        if tau > self.gmax:
            if self.total is not None and self.gmax > 0:
                self.total *= (tau / self.gmax) ** 2  # keep earlier samples clipped at the same level
            self.gmax = tau
        clip = (self.gmax / norms.clamp_min(1e-30)).clamp(max=1.0)
        moment = ((z * clip[:, None]) ** 2).mean(dim=0)
        self.total = moment if self.total is None else self.total + moment
        self.samples += 1

    def value(self) -> torch.Tensor:
        return (self.total / max(self.samples, 1)).float()


def shrink(moment: torch.Tensor, gamma: float) -> torch.Tensor:
    return (1.0 - gamma) * moment + gamma * moment.mean()


@dataclass
class LinearStats:
    input_moment: torch.Tensor   # E[x_j^2] over the layer's inputs
    output_moment: torch.Tensor  # GRAD_SCALE * E[(dL/dy_i)^2]

    def preconditioners(self, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(D_in, D_out) after shrinkage, as square roots of the second moments."""
        d_in = shrink(self.input_moment, gamma).sqrt().clamp_min(1e-12)
        d_out = shrink(self.output_moment, gamma).sqrt().clamp_min(1e-12)
        return d_in, d_out


@dataclass
class StatsCollector:
    names: list[str]
    inputs: dict[str, RobustSecondMoment] = field(default_factory=dict)
    grads: dict[str, RobustSecondMoment] = field(default_factory=dict)

    def collect(self, model, windows: torch.Tensor) -> dict[str, LinearStats]:
        """Forward and backward the next-token loss over each window (empirical Fisher), hooking every listed linear."""
        modules = dict(model.named_modules())
        handles = []
        for name in self.names:
            self.inputs[name] = RobustSecondMoment()
            self.grads[name] = RobustSecondMoment()
            module = modules[name]
            handles.append(module.register_forward_hook(
                lambda m, args, out, n=name: self.inputs[n].update(args[0])))
            handles.append(module.register_full_backward_hook(
                lambda m, gin, gout, n=name: self.grads[n].update(gout[0] * GRAD_SCALE)))
        params = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # lets gradients reach the frozen linears
        try:
            for window in tqdm(windows, desc="statistics", unit="window"):
                ids = window[None]
                out = model(input_ids=ids, labels=ids, use_cache=False)
                out.loss.backward()
                model.zero_grad(set_to_none=True)
        finally:
            for h in handles:
                h.remove()
            for p, flag in zip(model.parameters(), params):
                p.requires_grad_(flag)
        return {n: LinearStats(self.inputs[n].value(), self.grads[n].value() / GRAD_SCALE)
                for n in self.names}
