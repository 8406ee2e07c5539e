"""A NanoQuant model split over two llama.cpp RPC workers on 127.0.0.1 (bench.rpc.Workers): the local run's greedy
text, llama-server answering the openai client, and a worker built without NanoQuant refused when the model loads."""
from __future__ import annotations

import pytest

from bench.rpc import Workers
from bench.serverload import Server
from conftest import BIN, REPO, SMOL_GGUF, run_tool

WORKER = BIN / "ggml-rpc-server"
STOCK_WORKER = REPO / "build-stock" / "bin" / "ggml-rpc-server"  # `make test` builds it from the unpatched sdist
N_TOKENS = 32


def _greedy(model, *extra: str):
    # the workers keep NQ1 weights in plain buffers (the vec_dot path); --no-repack gives the local run the same
    proc = run_tool("llama-completion", "-m", model, "-p", "The capital of France is", "-n", str(N_TOKENS),
                    "--temp", "0", "--ignore-eos", "-no-cnv", "-t", "2", "--no-repack", *extra, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_split_over_two_workers_gives_the_local_greedy_text(smol_nq):
    local = _greedy(smol_nq)
    with Workers(WORKER, count=2) as workers:
        split = _greedy(smol_nq, "--rpc", workers.endpoints, "-ngl", "99", "-v")
    for device in ("RPC0", "RPC1"):  # both workers hold layers (the loader's debug lines, -v)
        assert f"assigned to device {device}" in split.stderr, split.stderr[-3000:]
    assert split.stdout == local.stdout
    assert len(local.stdout.split()) >= 10, local.stdout  # 32 tokens of text, not an empty answer


def test_llama_server_over_two_workers_answers_the_openai_client(smol_nq):
    openai = pytest.importorskip("openai", reason="the openai client comes with requirements.txt")
    with Workers(WORKER, count=2) as workers:
        with Server(BIN, smol_nq, extra=("--rpc", workers.endpoints, "-ngl", "99")) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=300)
            reply = client.chat.completions.create(model="nq", max_tokens=16, temperature=0,
                                                   messages=[{"role": "user", "content": "What is the capital of France?"}])
            assert reply.choices[0].finish_reason in ("stop", "length")
            assert reply.choices[0].message.content.strip(), reply


def test_a_worker_built_without_nanoquant_is_refused_when_the_model_loads(tiny_nq_models):
    """The stock worker accepts the connection and would take NQ1 tensors, then fail at the first compute; the
    NanoQuant model is refused at load naming the worker, while an ordinary model runs on the same worker."""
    if not STOCK_WORKER.is_file():
        pytest.fail(f"{STOCK_WORKER} is missing: `make test` builds it")
    with Workers(STOCK_WORKER, count=1) as workers:
        args = ("-p", "Hello", "-n", "4", "--temp", "0", "-no-cnv", "-t", "2", "--rpc", workers.endpoints, "-ngl", "99")
        refused = run_tool("llama-completion", "-m", tiny_nq_models["llama"], *args, timeout=300)
        assert refused.returncode > 0, (refused.returncode, refused.stderr[-3000:])  # < 0 would be a signal
        assert f"RPC worker {workers.endpoints}" in refused.stderr, refused.stderr[-3000:]
        assert "cannot run NanoQuant's NQ1 tensors" in refused.stderr
        plain = run_tool("llama-completion", "-m", SMOL_GGUF, *args, timeout=300)
        assert plain.returncode == 0, plain.stderr[-3000:]
