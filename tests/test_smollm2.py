"""The embedded default model, SmolLM2-135M-Instruct, at 1.0 bpw with a fast setting, runs in patched llama-cli."""
from conftest import run_tool
from nanoquant.fileinfo import describe


def test_realized_bpw_of_quantized_layers(smol_nq):
    """The default (sensitivity) allocation spends the target's bits within 0.5%, in multiples of 32 ranks, and
    moves them between layers: the ranks are not the method's per-shape rule."""
    info = describe(smol_nq)
    assert len(info.layers) == 30 * 7
    assert 0.995 <= info.bpw_linear <= 1.0, info.bpw_linear
    assert all(l.rank >= 32 and l.rank % 32 == 0 for l in info.layers)
    rule = {(576, 576): 256, (192, 576): 96, (1536, 576): 384, (576, 1536): 384}  # the method's rank rule
    assert sum(l.rank != rule[l.d_out, l.d_in] for l in info.layers) > len(info.layers) // 2


def test_llama_cli_answers_a_chat_prompt(smol_nq):
    proc = run_tool("llama-cli", "-m", smol_nq, "-p", "What is the capital of France?", "-n", "24", "-st",
                    "--temp", "0", "-t", "2", "--simple-io", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip()) > 0


def test_the_demo_answers_in_words(smol_nq):
    """`make demo`'s chat turn: the answer itself (after llama-cli's prompt echo), not only some output."""
    import re

    from conftest import BIN
    from nanoquant.demo import DEFAULT_PROMPT, chat_once

    answer = chat_once(BIN, smol_nq, DEFAULT_PROMPT)
    assert len(re.findall(r"[A-Za-z]{2,}", answer)) >= 3, repr(answer)
