"""Calibration windows and the Hessian-diagonal statistics (method spec section 3.4)."""
from __future__ import annotations

from contextlib import contextmanager
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

    def collect(self, model, blocks, windows: torch.Tensor, scratch: Path) -> dict[str, LinearStats]:
        """Forward and backward the next-token loss over each window (empirical Fisher), one decoder block at a time:
        a forward sweep records input moments and keeps every block boundary in `scratch`, a backward sweep from
        the head records output-gradient moments. Each layer sees the windows in order, as a whole-model pass would,
        but only one block's weights are needed at once (`blocks` loads and releases them)."""
        from .reconstruct import capture_block_inputs, logits_from_hidden, run_block

        scratch.mkdir(parents=True, exist_ok=True)
        self.inputs = {n: RobustSecondMoment() for n in self.names}
        self.grads = {n: RobustSecondMoment() for n in self.names}
        data = capture_block_inputs(model, windows)
        n_layers = len(model.model.layers)
        boundary = lambda i: scratch / f"boundary-{i:04d}.pt"  # noqa: E731
        x = data.fp
        for i in tqdm(range(n_layers), desc="statistics forward", unit="block"):
            torch.save(x, boundary(i))
            with self._hooks(model, blocks, i, "forward") as block:
                with torch.no_grad():
                    x = torch.cat([run_block(block, x[w:w + 1], data.layer_kwargs[i]) for w in range(x.shape[0])])
        grads = []
        for w in range(x.shape[0]):  # the loss model(input_ids, labels=input_ids) computes, per window
            h = x[w:w + 1].clone().requires_grad_(True)
            logits = logits_from_hidden(model, h).float()
            torch.nn.functional.cross_entropy(logits[0, :-1], windows[w, 1:]).backward()
            grads.append(h.grad)
        g = torch.cat(grads)
        for i in tqdm(reversed(range(n_layers)), desc="statistics backward", unit="block", total=n_layers):
            x_in = torch.load(boundary(i))
            with self._hooks(model, blocks, i, "backward") as block:
                g_in = []
                for w in range(x_in.shape[0]):
                    xi = x_in[w:w + 1].clone().requires_grad_(True)
                    run_block(block, xi, data.layer_kwargs[i]).backward(g[w:w + 1])
                    g_in.append(xi.grad)
                g = torch.cat(g_in)
            boundary(i).unlink()
        return {n: LinearStats(self.inputs[n].value(), self.grads[n].value() / GRAD_SCALE) for n in self.names}

    @contextmanager
    def _hooks(self, model, blocks, index: int, direction: str):
        blocks.load(model, index)
        block = model.model.layers[index]
        prefix = f"model.layers.{index}."
        handles = []
        for name in (n for n in self.names if n.startswith(prefix)):
            module = block.get_submodule(name[len(prefix):])
            if direction == "forward":
                handles.append(module.register_forward_hook(
                    lambda m, args, out, n=name: self.inputs[n].update(args[0])))
            else:
                handles.append(module.register_full_backward_hook(
                    lambda m, gin, gout, n=name: self.grads[n].update(gout[0] * GRAD_SCALE)))
        try:
            yield block
        finally:
            for h in handles:
                h.remove()
            blocks.release(model, index)
