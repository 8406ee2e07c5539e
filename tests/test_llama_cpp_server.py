"""llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`, its dependencies from requirements.txt)
serving a NanoQuant file through this build's libllama, driven by the openai client."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from bench.serverload import free_port
from conftest import BIN

START_TIMEOUT_S = 180


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]


def test_llama_cpp_server_answers_the_openai_client(smol_nq, tmp_path):
    openai = pytest.importorskip("openai", reason="the openai client comes with requirements.txt")
    port = free_port()
    # this build's libllama, which knows NQ1: a stock one refuses the file and the server never starts
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(BIN)}
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(smol_nq), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "1024", "--n_threads", "2"]
    log = open(tmp_path / "server.log", "w+")  # a file, not a pipe: the server's log would fill a pipe and block it
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"llama_cpp.server ended with {proc.returncode}:\n{_tail(log)}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.time() < deadline, "llama_cpp.server did not answer /v1/models in time"
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=300)
        assert [m.id for m in client.models.list().data] == [str(smol_nq)]
        reply = client.chat.completions.create(model=str(smol_nq), max_tokens=16, temperature=0,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.choices[0].message.content.strip(), reply
        streamed = client.completions.create(model=str(smol_nq), prompt="The sea is", max_tokens=8, temperature=0,
                                             stream=True)
        assert "".join(chunk.choices[0].text for chunk in streamed).strip()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
