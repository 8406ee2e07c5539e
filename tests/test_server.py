"""llama-server with the NQ model under concurrent load (bench.serverload): 4 slots, 8 openai clients, streamed and
plain chat completions, some dropped mid-stream; no request fails and the server is alive after it."""
from __future__ import annotations

import pytest

from conftest import BIN
from bench import serverload

pytest.importorskip("openai", reason="the openai client comes with requirements.txt")

CLIENTS, REQUESTS, MAX_TOKENS = 8, 3, 24
AGREE_TOKENS = 16


def test_server_under_load_fails_no_request_and_stays_up(smol_nq):
    with serverload.Server(BIN, smol_nq, slots=4) as server:
        lone = serverload.lone_tokens(server, serverload.PROMPTS[0], AGREE_TOKENS)
        report = serverload.run_load(server, CLIENTS, REQUESTS, MAX_TOKENS, drop_every=2)
        assert not report.failures, "\n".join(report.failures)
        assert report.server_alive_after
        assert report.count("cancelled") >= 2 and report.count("completed") == CLIENTS * REQUESTS - \
            report.count("cancelled")
        # greedy answers do not depend on what else the server is doing: the same prompt, answered alone and
        # beside the others in one batch, agrees in its first tokens
        batched = [r.tokens for r in report.requests if r.prompt == serverload.PROMPTS[0] and r.outcome == "completed"]
        assert batched, "the load had no completed request with the lone prompt"
        for tokens in batched:
            assert tokens[:AGREE_TOKENS] == lone[:AGREE_TOKENS], (tokens, lone)
        assert server.alive()
