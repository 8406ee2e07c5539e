"""A NanoQuant file drafting for its own model's larger file in llama-server (--model-draft): the target's greedy
answer is unchanged, and the server reports drafted and accepted tokens."""
from __future__ import annotations

import json
import urllib.request

from bench.serverload import Server
from conftest import BIN, SMOL_GGUF

N_TOKENS = 48
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def _complete(server: Server) -> dict:
    body = json.dumps({"prompt": PROMPT, "n_predict": N_TOKENS, "temperature": 0, "ignore_eos": True,
                       "cache_prompt": False}).encode()
    request = urllib.request.Request(server.url + "/completion", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def test_llama_server_with_a_nanoquant_draft_keeps_the_targets_greedy_answer(smol_nq):
    with Server(BIN, SMOL_GGUF) as server:
        alone = _complete(server)
    # llama-server drafts only when asked: --spec-type draft-simple (its default type is none)
    draft = ("--model-draft", str(smol_nq), "--spec-type", "draft-simple", "--spec-draft-n-max", "4")
    with Server(BIN, SMOL_GGUF, extra=draft) as server:
        drafted = _complete(server)
    timings = drafted["timings"]
    assert timings.get("draft_n", 0) > 0, timings  # the draft model was used
    assert 0 <= timings["draft_n_accepted"] <= timings["draft_n"], timings
    assert drafted["tokens_predicted"] == alone["tokens_predicted"] == N_TOKENS
    assert drafted["content"] == alone["content"], (alone["content"], drafted["content"])
