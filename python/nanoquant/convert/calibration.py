"""Calibration windows and the Hessian-diagonal statistics (method spec section 3.4)."""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from nanoquant.convert.admm import autocast_for
from nanoquant.convert.units import HEAD

# the calibration data: a wheel carries its own copy (pyproject's wheel.force-include), a checkout reads data/
_WHEEL_DATA = Path(__file__).resolve().parents[1] / "data"  # nanoquant/data
DATA_DIR = _WHEEL_DATA if _WHEEL_DATA.is_dir() else Path(__file__).resolve().parents[3] / "data"
DEFAULT_CALIBRATION_TEXT = DATA_DIR / "wikitext-2" / "valid.txt"
# the teacher answers these to make calibration conversations; data/chat/eval-instructions.txt is held out
DEFAULT_CHAT_INSTRUCTIONS = DATA_DIR / "chat" / "calibration-instructions.txt"
GRAD_SCALE = 1e6  # keeps tiny output gradients away from underflow; a constant factor for ADMM and Adam
CHAT_ANSWER_TOKENS = 192  # the teacher's answers are cut here: a calibration turn, not an essay


class CalibrationError(ValueError):
    pass


def window_bos(base_gguf: Path, tokenizer) -> int | None:
    """The token every window starts with, as llama.cpp starts every sequence: BOS where the GGUF's
    tokenizer.ggml.add_bos_token says so (the Hugging Face tokenizer's own habit where the key is missing)."""
    from gguf import GGUFReader

    fields = GGUFReader(base_gguf).fields
    add = fields.get("tokenizer.ggml.add_bos_token")
    bos = fields.get("tokenizer.ggml.bos_token_id")
    if add is None:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        uses = tokenizer.bos_token_id is not None and with_special[:1] == [tokenizer.bos_token_id]
        return tokenizer.bos_token_id if uses else None
    if not bool(add.contents()):
        return None
    return int(bos.contents()) if bos is not None else tokenizer.bos_token_id


def _starting_with(bos: int | None, ids: list[int]) -> list[int]:
    return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def text_windows(tokenizer, text_path: Path, n_windows: int, window: int, seed: int,
                 bos: int | None = None) -> torch.Tensor:
    """n_windows random windows of `window` tokens from the text, tokenized once (no special tokens); each starts
    with `bos` when given, as llama-perplexity's chunks do."""
    if n_windows == 0:
        return torch.empty(0, window, dtype=torch.long)
    text = Path(text_path).read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    body = window - (bos is not None)
    if ids.numel() <= body:
        raise CalibrationError(f"{text_path}: {ids.numel()} tokens, need more than the window of {window}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body, (n_windows,), generator=gen)
    head = [] if bos is None else [bos]
    return torch.stack([torch.tensor(head + ids[s:s + body].tolist()) for s in starts.tolist()])


def read_instructions(path: Path) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    instructions = [line for line in lines if line]
    if not instructions:
        raise CalibrationError(f"{path}: no instructions (expected one per line)")
    return instructions


def read_conversations(path: Path) -> list[list[dict]]:
    """A JSONL file of {"messages": [{"role": ..., "content": ...}, ...]} per line."""
    conversations = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            if not messages or not all(isinstance(m["role"], str) and isinstance(m["content"], str)
                                       for m in messages):
                raise ValueError("empty, or a message without a string role and content")
        except (ValueError, KeyError, TypeError) as e:
            raise CalibrationError(f"{path}:{n}: expected {{\"messages\": [{{\"role\": str, \"content\": str}}, ...]}}"
                                   f" ({type(e).__name__}: {e})") from None
        conversations.append(messages)
    if not conversations:
        raise CalibrationError(f"{path}: no conversations")
    return conversations


def teacher_conversations(teacher_gguf: Path, instructions: list[str], tokens_needed: int, tokenizer, seed: int,
                          threads: int) -> list[list[dict]]:
    """Single-turn conversations whose answers the teacher writes itself (through llama.cpp and the GGUF's own chat
    template, sampled with llama.cpp's default settings and seeded), instructions drawn in a seeded order until their
    rendered tokens reach `tokens_needed` or the list is used up. Sampled, not greedy: a small model's greedy answers
    loop on one sentence until the length limit (SmolLM2: 'The fastest land animal is not a specific animal...' x6),
    which would calibrate on repetition and on answers that never end their turn."""
    from nanoquant.runtime.model import Model

    order = torch.randperm(len(instructions), generator=torch.Generator().manual_seed(seed)).tolist()
    conversations, tokens = [], 0
    with Model(teacher_gguf, n_ctx=1024, n_threads=threads or None, seed=seed) as teacher, \
            tqdm(total=tokens_needed, desc="teacher answers", unit="token") as progress:
        for i in order:
            if tokens >= tokens_needed:
                break
            question = [{"role": "user", "content": instructions[i]}]
            answer = teacher.chat(question, max_tokens=CHAT_ANSWER_TOKENS)  # seeded by Model(seed=...)
            conversations.append(question + [{"role": "assistant", "content": answer.strip()}])
            rendered = len(render_conversation(tokenizer, conversations[-1], None))
            tokens += rendered
            progress.update(min(rendered, tokens_needed - progress.n))
    return conversations


def render_conversation(tokenizer, messages: list[dict], bos: int | None) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja2's TemplateError and the template's own raise_exception
        raise CalibrationError(f"the chat template refused a calibration conversation ({type(e).__name__}: {e})") \
            from None
    return _starting_with(bos, tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_windows(tokenizer, conversations: list[list[dict]], n_windows: int, window: int, seed: int,
                 bos: int | None = None) -> torch.Tensor:
    """Windows that start as a chat does (BOS where the model uses one, then the template's own opening): each is
    one multi-turn conversation made of conversations drawn in a seeded order (system messages only from its
    first), rendered by the model's chat template and cut at `window` tokens."""
    if n_windows == 0:
        return torch.empty(0, window, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    windows = []
    for _ in range(n_windows):
        messages: list[dict] = []
        ids: list[int] = []
        while len(ids) < window:
            if not order:
                order = torch.randperm(len(conversations), generator=gen).tolist()
            turn = conversations[order.pop()]
            messages += [m for m in turn if not (messages and m["role"] == "system")]
            longer = render_conversation(tokenizer, messages, bos)
            if len(longer) <= len(ids):
                raise CalibrationError("the chat template renders a longer conversation to fewer tokens")
            ids = longer
        windows.append(torch.tensor(ids[:window]))
    return torch.stack(windows)


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

    def to(self, device: torch.device) -> LinearStats:
        return LinearStats(self.input_moment.to(device), self.output_moment.to(device))

    def preconditioners(self, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(D_in, D_out) after shrinkage, as square roots of the second moments."""
        d_in = shrink(self.input_moment, gamma).sqrt().clamp_min(1e-12)
        d_out = shrink(self.output_moment, gamma).sqrt().clamp_min(1e-12)
        return d_in, d_out


# the output head's statistics (units.HEAD) are kept beside the decoder linears': its input moments are the
# importance matrix (llama.cpp's imatrix: E[x_j^2] per input column) with which the head is quantised to a K- or
# I-quant, and both moments precondition it as a NanoQuant layer (--nq-head)


@dataclass
class StatsCollector:
    names: list[str]
    # the dtype of the passes' products (torch autocast); the moments accumulate in float32 either way
    matmul: str = "float32"
    inputs: dict[str, RobustSecondMoment] = field(default_factory=dict)
    grads: dict[str, RobustSecondMoment] = field(default_factory=dict)

    def _autocast(self, device: torch.device):
        return autocast_for(device, self.matmul)

    def collect(self, model, blocks, windows: torch.Tensor, scratch: Path) -> dict[str, LinearStats]:
        """Forward and backward the next-token loss over each window (empirical Fisher), one decoder block at a time:
        a forward sweep records input moments and keeps every block boundary in `scratch`, a backward sweep from
        the head records output-gradient moments. Each layer sees the windows in order, as a whole-model pass would,
        but only one block's weights are needed at once (`blocks` loads and releases them)."""
        from nanoquant.convert.reconstruct import capture_block_inputs, logits_from_hidden, run_block

        scratch.mkdir(parents=True, exist_ok=True)
        self.inputs = {n: RobustSecondMoment() for n in self.names}
        self.grads = {n: RobustSecondMoment() for n in self.names}
        data = capture_block_inputs(model, windows)
        n_layers = len(model.model.layers)
        boundary = lambda i: scratch / f"boundary-{i:04d}.pt"  # noqa: E731
        x = data.fp
        autocast = lambda: self._autocast(x.device)  # noqa: E731
        for i in tqdm(range(n_layers), desc="statistics forward", unit="block"):
            torch.save(x, boundary(i))
            with self._hooks(model, blocks, i, "forward") as block:
                with torch.no_grad(), autocast():
                    x = torch.cat([run_block(block, x[w:w + 1], data.layer_kwargs[i]).float()
                                   for w in range(x.shape[0])])
        grads = []
        self.inputs[HEAD], self.grads[HEAD] = RobustSecondMoment(), RobustSecondMoment()
        head = model.lm_head
        hooks = [head.register_forward_hook(lambda m, args, out: self.inputs[HEAD].update(args[0])),
                 head.register_full_backward_hook(lambda m, gin, gout: self.grads[HEAD].update(gout[0] * GRAD_SCALE))]
        try:
            for w in range(x.shape[0]):  # the loss model(input_ids, labels=input_ids) computes, per window
                h = x[w:w + 1].clone().requires_grad_(True)
                with autocast():
                    logits = logits_from_hidden(model, h).float()
                torch.nn.functional.cross_entropy(logits[0, :-1], windows[w, 1:]).backward()
                grads.append(h.grad)
        finally:
            for hook in hooks:
                hook.remove()
        g = torch.cat(grads)
        for i in tqdm(reversed(range(n_layers)), desc="statistics backward", unit="block", total=n_layers):
            x_in = torch.load(boundary(i))
            with self._hooks(model, blocks, i, "backward") as block:
                g_in = []
                for w in range(x_in.shape[0]):
                    xi = x_in[w:w + 1].clone().requires_grad_(True)
                    with autocast():
                        out = run_block(block, xi, data.layer_kwargs[i])
                    out.backward(g[w:w + 1].to(out.dtype))
                    g_in.append(xi.grad)
                g = torch.cat(g_in)
            boundary(i).unlink()
        return {n: LinearStats(self.inputs[n].value(), self.grads[n].value() / GRAD_SCALE) for n in [*self.names, HEAD]}

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
