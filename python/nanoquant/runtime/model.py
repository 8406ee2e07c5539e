"""Scripted generation with NanoQuant (and any other) GGUF models, over the patched libllama the tools use.

    from nanoquant import Model

    with Model("model.gguf", n_ctx=2048) as m:
        print(m.generate("The capital of France is", max_tokens=16, temperature=0))
        for piece in m.chat([{"role": "user", "content": "Hi!"}], stream=True):
            print(piece, end="", flush=True)

The native part (`nanoquant._core.Engine`) decodes with the GIL released; this module adds sampling settings, stop
strings, UTF-8 assembly of token pieces, chat templates, and Python exceptions with messages that name the file.
"""
from __future__ import annotations

import codecs
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from nanoquant.fileformat.info import describe

GGUF_MAGIC = b"GGUF"


class ModelLoadError(RuntimeError):
    """The file is missing, not a GGUF, or llama.cpp refused it; the message names the file and quotes the reason."""


class ContextOverflowError(ValueError):
    """More tokens than the context holds."""


def _core():
    from nanoquant import _core  # built by `make`; imported late so that a missing build is a clear error, not an import crash
    return _core


class Model:
    """One GGUF model and one llama.cpp context. Close it (or use `with`) to free its memory at once."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 4096, n_threads: int | None = None, seed: int = 0,
                 n_batch: int = 512, repack: bool = True, verbose: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such model file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path}: not a GGUF file (it starts with {magic!r}, expected {GGUF_MAGIC!r})")
        for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        n_threads = n_threads or os.cpu_count() or 1
        core = _core()
        core.set_llama_log_verbose(verbose)
        try:
            self._engine = core.Engine(str(self.path), n_ctx, n_threads, min(n_batch, n_ctx), repack)
        except RuntimeError as e:
            raise ModelLoadError(str(e)) from None
        self._generation = 0  # the latest stream(); an older one still being iterated would share the context
        self._seeds = random.Random(seed)  # one seed per call unless the call gives one: reproducible, not repeated

    # --- lifetime ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Frees the context and the weights now (idempotent)."""
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()

    @property
    def closed(self) -> bool:
        return getattr(self, "_engine", None) is None or self._engine.closed

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    def _live(self):
        if self.closed:
            raise RuntimeError(f"{self.path}: the model is closed")
        return self._engine

    # --- vocabulary ----------------------------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self._live().n_ctx

    @property
    def n_vocab(self) -> int:
        return self._live().n_vocab

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; BOS is added when the model asks for it and add_special is on (as llama-completion)."""
        return self._live().tokenize(text, add_special, parse_special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return self._live().detokenize(list(tokens), False, special).decode("utf-8", errors="replace")

    def _check_fits(self, n_tokens: int, what: str) -> None:
        if n_tokens > self.n_ctx:
            raise ContextOverflowError(f"{what} is {n_tokens} tokens, more than the context of {self.n_ctx} "
                                       f"(Model(..., n_ctx=...) sets it)")

    # --- generation ----------------------------------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
               top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
               stop: str | Iterable[str] | None = None, seed: int | None = None,
               ignore_eos: bool = False) -> Iterator[str]:
        """Yields the continuation of `prompt` piece by piece. Generation ends at an end-of-generation token,
        after `max_tokens`, at the first stop string (not yielded), or when the context is full.
        temperature <= 0 is greedy decoding; ignore_eos never samples end-of-generation tokens (for benchmarks).
        `prompt` may be text or token ids."""
        engine = self._live()
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or ()) if s]
        ids = self._ids(prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, ignore_eos)
        return _cut_at_stops(self._pieces(engine, ids), stops)

    def generate_ids(self, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = 0.8,
                     top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                     seed: int | None = None, ignore_eos: bool = False) -> list[int]:
        """The continuation of `prompt` as token ids, the end-of-generation token included when one ends it (see
        stream() for the settings). Text tokenized back need not give the ids that were sampled; these are they."""
        return list(self._ids(prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed,
                              ignore_eos))

    def _ids(self, prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed,
             ignore_eos) -> Iterator[int]:
        """Sampled ids: the end-of-generation token is the last when one comes; a full context ends them too."""
        engine = self._live()
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self._check_fits(len(tokens), "the prompt")
        settings = _core().SamplerSettings()
        settings.temperature, settings.top_k, settings.top_p = float(temperature), int(top_k), float(top_p)
        settings.min_p, settings.repeat_penalty = float(min_p), float(repeat_penalty)
        settings.seed = self._seeds.getrandbits(32) if seed is None else int(seed) & 0xFFFFFFFF
        settings.ignore_eos = bool(ignore_eos)
        self._generation += 1
        return self._steps(engine, tokens, settings, max_tokens, self._generation)

    def _steps(self, engine, tokens: list[int], settings, max_tokens: int, generation: int) -> Iterator[int]:
        engine.prefill(tokens)
        engine.set_sampler(settings)
        for _ in range(max_tokens):
            if generation != self._generation:  # both would decode into the one context
                raise RuntimeError(f"{self.path}: another generation started on this model before this stream "
                                   "ended; finish or close a stream before starting the next")
            before = engine.n_cached
            token = int(engine.step())
            yield token
            if engine.is_eog(token) or engine.n_cached == before:  # the context is full: it was not decoded
                return

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 stop: str | Iterable[str] | None = None, seed: int | None = None, ignore_eos: bool = False) -> str:
        """The continuation of `prompt` as one string (see stream() for the settings)."""
        return "".join(self.stream(prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, stop, seed,
                                   ignore_eos))

    @staticmethod
    def _pieces(engine, ids: Iterator[int]) -> Iterator[str]:
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
        for token in ids:
            if engine.is_eog(token):
                break
            text = utf8.decode(engine.token_to_piece(token, False))
            if text:
                yield text
        tail = utf8.decode(b"", final=True)
        if tail:
            yield tail

    # --- chat ----------------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text the GGUF's own chat template (`tokenizer.chat_template`) makes of `messages`."""
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise TypeError(f"messages[{i}]: expected {{'role': str, 'content': str}}, got {message!r}")
        template = self._live().chat_template()
        if not template:
            raise ValueError(f"{self.path}: the GGUF has no tokenizer.chat_template; use generate() with a prompt")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                bos_token=self._token_text("bos"), eos_token=self._token_text("eos"))

    def _token_text(self, which: str) -> str:
        engine = self._live()
        return engine.token_to_piece(getattr(engine, which), True).decode("utf-8", errors="replace")

    def chat(self, messages: Sequence[dict], max_tokens: int = 256, temperature: float = 0.8, top_k: int = 40,
             top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
             stop: str | Iterable[str] | None = None, seed: int | None = None,
             stream: bool = False) -> str | Iterator[str]:
        """The assistant's reply to `messages` ([{'role': 'user', 'content': ...}, ...]) under the GGUF's chat
        template; an iterator of pieces when stream=True."""
        prompt = self.apply_chat_template(messages)
        bos_text = self._token_text("bos")
        # the template may write BOS itself; add it only where it does not (llama-server does the same)
        tokens = self.tokenize(prompt, add_special=not (bos_text and prompt.startswith(bos_text)), parse_special=True)
        pieces = self.stream(tokens, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, stop, seed)
        return pieces if stream else "".join(pieces)

    # --- scoring -------------------------------------------------------------------------------------------------
    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every position, (len(tokens), n_vocab) float32, decoded from an empty context."""
        tokens = [int(t) for t in tokens]
        self._check_fits(len(tokens), "logits(): the token list")
        return self._live().logits(tokens)

    def perplexity(self, text: str, n_ctx: int = 512, n_chunks: int | None = None) -> float:
        """Perplexity of `text` by llama-perplexity's protocol: the text tokenized once (BOS as the model says),
        cut into chunks of n_ctx tokens whose first token becomes BOS, the second half of each chunk scored;
        `n_chunks` limits the chunks (all by default)."""
        self._check_fits(n_ctx, "perplexity(): one chunk")
        tokens = self.tokenize(text, add_special=True, parse_special=False)
        if len(tokens) < n_ctx:
            raise ValueError(f"perplexity(): the text is {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
        nll, scored_per_chunk = self._live().perplexity(tokens, n_ctx, -1 if n_chunks is None else int(n_chunks))
        return math.exp(sum(nll) / (scored_per_chunk * len(nll)))

    # --- description ---------------------------------------------------------------------------------------------
    def info(self) -> dict:
        """Architecture, sizes, each NanoQuant layer's shape, rank and bits per weight (counted from the file), and the
        settings the converter ran with (None for files that do not record them)."""
        engine = self._live()
        meta = engine.metadata()
        file = describe(self.path)
        layers = [{"name": l.base, "d_out": l.d_out, "d_in": l.d_in, "rank": l.rank, "bpw": l.bpw}
                  for l in file.layers]
        return {"path": str(self.path), "architecture": meta.get("general.architecture"),
                "name": meta.get("general.name"), **engine.sizes(), "file_bytes": file.size_bytes,
                "nq_layers": layers, "bpw_linear": file.bpw_linear if layers else None,
                "conversion_settings": file.conversion_settings}

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}{', closed' if self.closed else ''})"


def _cut_at_stops(pieces: Iterator[str], stops: list[str]) -> Iterator[str]:
    """Passes text through until the first stop string, which is not emitted; text that might begin a stop string
    is held back until it is known not to. Returning closes `pieces`, which ends decoding."""
    if not stops:
        yield from pieces
        return
    held = ""
    for piece in pieces:
        held += piece
        hits = [i for i in (held.find(s) for s in stops) if i >= 0]
        if hits:
            if min(hits) > 0:
                yield held[:min(hits)]
            if hasattr(pieces, "close"):  # a generator: end its decoding now
                pieces.close()
            return
        keep = max((k for s in stops for k in range(min(len(s) - 1, len(held)), 0, -1) if held.endswith(s[:k])),
                   default=0)
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    if held:
        yield held
