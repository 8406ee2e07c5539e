"""llama-server under concurrent load, driven by the `openai` client, and the one llama-server launcher.

A run starts llama-server on a loopback port (`-np` slots, continuous batching, which llama-server does by default),
then CLIENTS threads send chat completions, streamed and not, a bounded number each; some streamed requests are
dropped after a few chunks (the client closes the connection). Every request must end as completed (a finish
reason) or cancelled (dropped by us); anything else is a failure. The server must still answer /health after it.
"""
from __future__ import annotations

import socket
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

PROMPTS = (
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "How many legs does a spider have?",
    "What do bees make?",
    "Give me a word that rhymes with cat.",
    "What is two plus three?",
    "Why is the sky blue? Answer briefly.",
)
START_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerFailed(RuntimeError):
    """llama-server ended or did not answer /health in time; returncode is None when it was still running."""

    def __init__(self, message: str, returncode: int | None, output: str):
        super().__init__(message)
        self.returncode, self.output = returncode, output


class Server:
    """llama-server on 127.0.0.1 for the life of a `with` block: the one launcher of the tests and benchmarks.
    Entering waits for /health and raises ServerFailed (with the server's output) if it ends or times out first."""

    def __init__(self, bin_dir: Path, model: Path, slots: int = 1, ctx_per_slot: int = 1024, threads: int = 2,
                 extra: tuple[str, ...] = (), start_timeout_s: float = START_TIMEOUT_S):
        self.port = free_port()
        self.cmd = [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                    "-np", str(slots), "-c", str(slots * ctx_per_slot), "-t", str(threads), "--no-webui", *extra]
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.healthy()

    def output(self) -> str:
        if self.proc is not None and self.proc.poll() is not None and self._reader is not None:
            self._reader.join(5)  # the whole output of an ended server
        return "".join(self.log)

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", stdin=subprocess.DEVNULL)
        self._reader = threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.healthy():
            ended = self.proc.poll()
            if ended is not None or time.monotonic() > deadline:
                self.__exit__()
                what = f"ended with {ended}" if ended is not None else f"did not answer in {self.start_timeout_s:.0f} s"
                output = self.output()
                raise ServerFailed(f"llama-server {what} ({' '.join(self.cmd)}):\n" + output[-3000:], ended, output)
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Request:
    client: int
    index: int
    prompt: str
    stream: bool
    drop_after: int | None   # chunks read before the client closes the connection (streamed requests only)
    outcome: str = ""        # "completed", "cancelled" or "failed: ..."
    tokens: list[str] = field(default_factory=list)
    completion_tokens: int = 0


def _client(url: str):
    import openai
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=REQUEST_TIMEOUT_S)


def send(client, request: Request, max_tokens: int, ignore_eos: bool = False) -> Request:
    """One chat completion, greedy, with the tokens it produced (their text, from logprobs)."""
    args = dict(model="nq", messages=[{"role": "user", "content": request.prompt}], max_tokens=max_tokens,
                temperature=0.0, logprobs=True, extra_body={"ignore_eos": ignore_eos})
    try:
        if not request.stream:
            reply = client.chat.completions.create(**args)
            choice = reply.choices[0]
            request.tokens = [t.token for t in (choice.logprobs.content or [])] if choice.logprobs else []
            request.completion_tokens = reply.usage.completion_tokens
            request.outcome = "completed" if choice.finish_reason in ("stop", "length") else \
                f"failed: finish reason {choice.finish_reason!r}"
            return request
        stream = client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
        finish = None
        for n, chunk in enumerate(stream):
            if request.drop_after is not None and n >= request.drop_after:
                stream.close()  # the client goes away mid-answer
                request.outcome = "cancelled"
                return request
            for choice in chunk.choices:
                if choice.logprobs and choice.logprobs.content:
                    request.tokens += [t.token for t in choice.logprobs.content]
                finish = choice.finish_reason or finish
            if chunk.usage is not None:
                request.completion_tokens = chunk.usage.completion_tokens
        request.outcome = "completed" if finish in ("stop", "length") else f"failed: stream ended without a finish " \
                                                                           f"reason (last {finish!r})"
    except Exception as e:  # noqa: BLE001: every way a request can go wrong is a failed request of the run
        request.outcome = f"failed: {type(e).__name__}: {e}"
    return request


@dataclass
class LoadReport:
    requests: list[Request]
    seconds: float
    server_alive_after: bool

    def count(self, outcome: str) -> int:
        return sum(r.outcome.startswith(outcome) for r in self.requests)

    @property
    def failures(self) -> list[str]:
        return [f"client {r.client} request {r.index}: {r.outcome}" for r in self.requests
                if not r.outcome.startswith(("completed", "cancelled"))]

    @property
    def tokens_per_s(self) -> float:
        return sum(r.completion_tokens for r in self.requests) / self.seconds


def run_load(server: Server, clients: int, requests_per_client: int, max_tokens: int, drop_every: int = 0,
             ignore_eos: bool = False) -> LoadReport:
    """clients threads x requests_per_client requests; odd requests stream; with drop_every, every drop_every-th
    streamed request is dropped after 3 chunks."""
    plan, streamed = [], 0
    for c in range(clients):
        for i in range(requests_per_client):
            stream = (c + i) % 2 == 1
            streamed += stream
            drop = 3 if stream and drop_every and streamed % drop_every == 0 else None
            plan.append(Request(c, i, PROMPTS[(c + i) % len(PROMPTS)], stream, drop))
    by_client = [[r for r in plan if r.client == c] for c in range(clients)]

    def work(requests: list[Request]) -> None:
        client = _client(server.url)
        for request in requests:
            send(client, request, max_tokens, ignore_eos)

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(work, by_client))
    seconds = time.monotonic() - start
    return LoadReport(plan, seconds, server.alive())


def lone_tokens(server: Server, prompt: str, max_tokens: int) -> list[str]:
    request = send(_client(server.url), Request(-1, 0, prompt, False, None), max_tokens)
    if request.outcome != "completed":
        raise RuntimeError(f"the lone request failed: {request.outcome}")
    return request.tokens
