"""nanoquant.Model (the pybind11 API over the patched libllama) against the llama.cpp tools, and its behaviour."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import BIN, REPO, llama_perplexity, run_tool
from nanoquant import ContextOverflowError, Model, _core
from nanoquant.runtime.model import _cut_at_stops

PROMPT = "The history of the city begins"


def llama_completion(model, prompt: str, n: int) -> str:
    """Greedy continuation printed by llama-completion (no chat template, prompt not echoed)."""
    proc = run_tool("llama-completion", "-m", model, "-p", prompt, "-n", n, "--temp", "0", "-no-cnv",
                    "--no-display-prompt", "-t", "2", "-c", "1024", "--no-warmup", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # llama-completion ends its output with "\n\n", after " [end of text]\n" when the model ended it
    return proc.stdout.removesuffix("\n\n").removesuffix(" [end of text]\n")


@pytest.fixture(scope="module")
def tiny(tiny_nq_models):
    with Model(tiny_nq_models["llama"], n_ctx=1024, n_threads=2) as m:
        yield m


@pytest.fixture(scope="module")
def smol(smol_nq):
    with Model(smol_nq, n_ctx=1024, n_threads=2) as m:  # as llama_completion()
        yield m


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_greedy_generate_equals_llama_completion(which, request):
    model = request.getfixturevalue(which)
    expected = llama_completion(model.path, PROMPT, 32)
    assert len(expected) > 0
    assert model.generate(PROMPT, max_tokens=32, temperature=0) == expected


def test_decoding_runs_every_nanoquant_layer_fused(smol):
    """Inside llama.cpp's graph, every NanoQuant layer of a decode-sized batch takes ggml-cpu's fused step
    (ggml_patches/0005): SmolLM2 has 30 blocks of 7 factorised linears, so each graph adds exactly 210."""
    per_graph = 30 * 7
    before = _core.nq1_fused_layers()
    smol.generate(PROMPT, max_tokens=4, temperature=0)  # the prompt's batch (or its cached part) + 3 decoded tokens
    fused = _core.nq1_fused_layers() - before
    assert fused >= 3 * per_graph and fused % per_graph == 0, fused


def test_perplexity_equals_llama_perplexity(smol, eval_text):
    ours = smol.perplexity(eval_text.read_text(encoding="utf-8"), n_ctx=512, n_chunks=4)
    theirs = llama_perplexity(smol.path, eval_text, 512, 4)
    assert abs(ours - theirs) / theirs < 0.005, (ours, theirs)


def test_logits_agree_with_greedy_choice(tiny):
    tokens = tiny.tokenize(PROMPT)
    logits = tiny.logits(tokens)
    assert logits.shape == (len(tokens), tiny.n_vocab) and logits.dtype == np.float32
    first = tiny.generate(tokens, max_tokens=1, temperature=0)
    assert tiny.detokenize([int(np.argmax(logits[-1]))]) == first
    # the cache is rebuilt from scratch: the same call twice gives the same numbers
    assert np.array_equal(logits, tiny.logits(tokens))


def test_stream_yields_the_text_of_generate(tiny):
    settings = dict(max_tokens=40, temperature=0.9, top_k=50, seed=1234)
    pieces = list(tiny.stream(PROMPT, **settings))
    assert len(pieces) > 1
    assert "".join(pieces) == tiny.generate(PROMPT, **settings)
    assert tiny.generate(PROMPT, **{**settings, "seed": 99}) != "".join(pieces)  # the seed is used


def test_generate_ids_are_the_ids_generate_writes(tiny):
    settings = dict(max_tokens=40, temperature=0.9, top_k=50, seed=7)
    ids = tiny.generate_ids(PROMPT, **settings)
    assert 1 <= len(ids) <= 40 and all(isinstance(t, int) for t in ids)
    assert tiny.detokenize(ids) == tiny.generate(PROMPT, **settings)  # an end-of-generation token detokenizes to ""
    long = tiny.generate_ids(PROMPT, max_tokens=30, temperature=0, ignore_eos=True)
    assert len(long) == 30 and tiny.detokenize(long) == tiny.generate(PROMPT, max_tokens=30, temperature=0,
                                                                      ignore_eos=True)


def test_stop_strings_end_generation(tiny):
    full = tiny.generate(PROMPT, max_tokens=40, temperature=0)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    assert tiny.generate(PROMPT, max_tokens=40, temperature=0, stop=stop) == expected
    assert "".join(tiny.stream(PROMPT, max_tokens=40, temperature=0, stop=[stop, "\x00never"])) == expected


def test_stop_strings_split_across_pieces():
    pieces = ["Hel", "lo, wor", "ld! E", "ND and more"]
    assert "".join(_cut_at_stops(iter(pieces), ["END"])) == "Hello, world! "
    assert "".join(_cut_at_stops(iter(pieces), ["lo, w"])) == "Hel"
    assert "".join(_cut_at_stops(iter(pieces), ["absent"])) == "".join(pieces)
    # text that could start a stop string is held back, then released when it turns out not to
    assert list(_cut_at_stops(iter(["ab", "c", "d"]), ["bcx"])) == ["a", "bcd"]


def test_ignore_eos_runs_to_max_tokens(tiny):
    tokens_before = len(tiny.tokenize(PROMPT))
    tiny.generate(PROMPT, max_tokens=50, temperature=0, ignore_eos=True)
    assert tiny._engine.n_cached == tokens_before + 50


def test_two_models_do_not_interfere(tiny_nq_models):
    settings = dict(max_tokens=24, temperature=0)
    # two prompts: tiny random models tend to repeat a prompt's last token, so two of them could agree on one prompt
    other = "Once upon a time there was"
    with Model(tiny_nq_models["llama"], n_ctx=512) as a, Model(tiny_nq_models["qwen3"], n_ctx=512) as b:
        alone_a, alone_b = a.generate(PROMPT, **settings), b.generate(other, **settings)
        stream_a, stream_b = a.stream(PROMPT, **settings), b.stream(other, **settings)
        got_a, got_b = [], []
        for piece_a, piece_b in zip(stream_a, stream_b):  # decode steps alternate between the two contexts
            got_a.append(piece_a)
            got_b.append(piece_b)
        got_a += list(stream_a)
        got_b += list(stream_b)
    assert ("".join(got_a), "".join(got_b)) == (alone_a, alone_b)
    assert alone_a != alone_b


def test_a_second_stream_on_one_model_is_refused(tiny):
    first = tiny.stream(PROMPT, max_tokens=8, temperature=0)
    next(first)
    second = "".join(tiny.stream(PROMPT, max_tokens=8, temperature=0))
    assert second
    with pytest.raises(RuntimeError, match="another generation started"):
        list(first)


def test_context_overflow(tiny_nq_models):
    with Model(tiny_nq_models["llama"], n_ctx=64) as m:
        n_ctx = m.n_ctx  # llama.cpp rounds the context up to its padding (256)
        assert 64 <= n_ctx <= 256
        long_prompt = " ".join(["word"] * (n_ctx + 50))
        with pytest.raises(ContextOverflowError, match=f"more than the context of {n_ctx}"):
            m.generate(long_prompt)
        with pytest.raises(ContextOverflowError):
            m.logits(m.tokenize(long_prompt))
        with pytest.raises(ContextOverflowError):
            m.perplexity(long_prompt, n_ctx=n_ctx + 1)
        prompt = m.tokenize(" ".join(["word"] * (n_ctx - 20)))[: n_ctx - 20]
        m.generate(prompt, max_tokens=500, temperature=0, ignore_eos=True)  # stops when the context is full
        assert m._engine.n_cached == n_ctx


def test_close_frees_and_later_calls_raise(tiny_nq_models):
    with Model(tiny_nq_models["llama"], n_ctx=256) as m:
        assert m.generate(PROMPT, max_tokens=4, temperature=0)
    assert m.closed
    with pytest.raises(RuntimeError, match="closed"):
        m.generate(PROMPT)
    m.close()  # idempotent


def test_decoding_releases_the_gil(smol, eval_text):
    text = eval_text.read_text(encoding="utf-8")
    result = []
    worker = threading.Thread(target=lambda: result.append(smol.perplexity(text, n_ctx=512, n_chunks=3)))
    counted = 0
    start = time.perf_counter()
    worker.start()
    while worker.is_alive():  # ends when the call returns or raises: a failing worker cannot hang the test
        counted += 1
    worker.join()
    elapsed = time.perf_counter() - start
    assert result, "the perplexity call in the worker thread raised (see the thread's traceback above)"
    assert elapsed > 0.5
    # a thread holding the GIL for the whole call would leave this loop a few switch intervals (5 ms each)
    assert counted > 100_000, (counted, elapsed)


def test_chat_uses_the_gguf_template(smol):
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a colour."}]
    prompt = smol.apply_chat_template(messages)
    assert "<|im_start|>system\nYou are brief.<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    reply = smol.chat(messages, max_tokens=16, temperature=0)
    assert reply == "".join(smol.chat(messages, max_tokens=16, temperature=0, stream=True))
    assert reply.strip() and "<|im_end|>" not in reply
    with pytest.raises(TypeError, match=r"messages\[0\]"):
        smol.chat([{"role": "user"}])


def test_info_describes_the_nq_layers(smol):
    info = smol.info()
    assert info["architecture"] == "llama" and info["n_layer"] == 30 and info["n_embd"] == 576
    assert len(info["nq_layers"]) == 30 * 7
    assert all(l["rank"] % 32 == 0 and l["rank"] >= 32 for l in info["nq_layers"])
    assert 0.995 <= info["bpw_linear"] <= 1.0
    from nanoquant.convert.settings import PRESETS
    fast, made = PRESETS["fast"], info["conversion_settings"]  # conftest's smol_nq: --preset fast
    assert (made["bpw"], made["calib_windows"], made["admm"]["iterations"], made["distill"]["steps"]) == \
        (1.0, fast.calib_windows, fast.admm.iterations, fast.distill.steps)
    assert made["calib_text"] == "valid.txt" and made["calib_chat"] == "auto"  # a name, not a local path


def test_cli_generate_and_info(tiny_nq_models):
    path = tiny_nq_models["llama"]
    cmd = [sys.executable, "-m", "nanoquant"]
    gen = subprocess.run(cmd + ["generate", str(path), "-p", PROMPT, "-n", "12", "--temp", "0", "-c", "256"],
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    with Model(path, n_ctx=256) as m:
        assert gen.stdout == m.generate(PROMPT, max_tokens=12, temperature=0) + "\n"
    info = subprocess.run(cmd + ["info", str(path), "--json"], capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    assert len(json.loads(info.stdout)["nq_layers"]) == 2 * 7
    text = subprocess.run(cmd + ["info", str(path)], capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and "converted:     1.0 bpw target" in text.stdout, text.stderr
    bad = subprocess.run(cmd + ["info", str(path) + ".missing"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no such model file" in bad.stderr and "Traceback" not in bad.stderr


def test_llama_cpp_python_runs_nq_models_on_this_libllama(smol_nq, tmp_path):
    """The ecosystem's binding (installed by make without its native build) over build/bin/libllama.so.
    Its logits are compared, not its greedy text: a chat before the prompt leaves a cached prefix, so it decodes the
    prompt in other batches than Model does, and a weak 1-bit model has near-ties that such rounding can flip.
    flash_attn=True matches Model's context (llama.cpp's default, "auto", turns it on for the CPU)."""
    logits_file = tmp_path / "llama_cpp_logits.npy"
    script = f"""
import json, llama_cpp, numpy as np
llm = llama_cpp.Llama(model_path={str(smol_nq)!r}, n_ctx=1024, n_threads=2, logits_all=True, verbose=False,
                      flash_attn=True)
chat = llm.create_chat_completion(messages=[{{"role": "user", "content": "Name a colour."}}], max_tokens=16,
                                  temperature=0)
text = llm({PROMPT!r}, max_tokens=24, temperature=0)["choices"][0]["text"]
tokens = llm.tokenize({PROMPT!r}.encode(), add_bos=True, special=True)
llm.reset()
llm.eval(tokens)
np.save({str(logits_file)!r}, llm.scores[:len(tokens)])
print(json.dumps({{"lib": llama_cpp.llama_cpp._lib._name, "chat": chat["choices"][0]["message"]["content"],
                  "text": text, "tokens": tokens}}))
"""
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(BIN)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["lib"] == str(REPO / "build" / "bin" / "libllama.so")
    assert out["chat"].strip() and out["text"].strip()
    with Model(smol_nq, n_ctx=1024, n_threads=2) as m:
        assert out["tokens"] == m.tokenize(PROMPT)
        ours = m.logits(out["tokens"])
    theirs = np.load(logits_file)
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-3 * float(np.abs(ours).max()))
