"""Bad input ends in a clear error naming the problem and a non-zero exit: never a crash or a partial file."""

import gguf
import numpy as np
import pytest

from conftest import make_tiny_model, run_converter, run_tool
from nanoquant import formats
from nanoquant.gguf_writer import copy_metadata
from nanoquant.reference import NQFormatError, load_reference_model

TOOLS = ("llama-completion", "llama-perplexity")


def _load_with_tool(tool, path, text_file):
    args = ["-m", path, "-t", "2"]
    args += ["-f", text_file, "-c", "128", "--chunks", "1"] if tool == "llama-perplexity" else ["-p", "hi", "-n", "2",
                                                                                                "-no-cnv"]
    return run_tool(tool, *args, timeout=300)


def _assert_clean_failure(proc, *needles):
    """Each needle is a string or a tuple of alternatives. llama.cpp logs through a background thread that is not
    always flushed at exit, so the last lines (those naming the file) can be missing: accept the earlier ones."""
    assert proc.returncode > 0, f"expected a clean non-zero exit, got {proc.returncode}"  # < 0 would be a signal
    for needle in needles:
        options = (needle,) if isinstance(needle, str) else needle
        assert any(option in proc.stderr for option in options), proc.stderr[-2000:]


@pytest.fixture(scope="module")
def truncated(tiny_nq_models, tmp_path_factory):
    src = tiny_nq_models["llama"]
    data = src.read_bytes()
    path = tmp_path_factory.mktemp("bad") / "truncated.gguf"
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


@pytest.fixture(scope="module")
def rank_mismatch(tiny_nq_models, tmp_path_factory):
    """blk.0.attn_q.nq_u one rank block wider than its nq_v."""
    src = tiny_nq_models["llama"]
    path = tmp_path_factory.mktemp("bad") / "rank-mismatch.gguf"
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(path, reader.fields["general.architecture"].contents())
    copy_metadata(reader, writer)
    for t in reader.tensors:
        if t.name == "blk.0.attn_q.nq_u":
            d_out, rank = int(t.shape[1]), int(t.shape[0])
            signs = np.ones((d_out, rank + 32), dtype=np.float32)
            writer.add_tensor(t.name, formats.pack_signs(signs), raw_dtype=formats.NQ1)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tool", TOOLS)
def test_truncated_file_fails_cleanly_in_tools(tool, truncated, eval_text):
    _assert_clean_failure(_load_with_tool(tool, truncated, eval_text),
                          ("truncated.gguf", "not within the file bounds, model is corrupted or incomplete"))


def test_truncated_file_raises_in_python(truncated):
    with pytest.raises(NQFormatError, match="truncated.gguf"):
        load_reference_model(truncated)


@pytest.mark.parametrize("tool", TOOLS)
def test_rank_mismatch_fails_cleanly_in_tools(tool, rank_mismatch, eval_text):
    _assert_clean_failure(_load_with_tool(tool, rank_mismatch, eval_text), "blk.0.attn_q.nq_u", "wrong shape")


def test_rank_mismatch_raises_in_python(rank_mismatch):
    with pytest.raises(NQFormatError, match=r"blk\.0\.attn_q\.nq_u has rank 64 but blk\.0\.attn_q\.nq_v has rank 32"):
        load_reference_model(rank_mismatch)


def test_unsupported_architecture(tmp_path, smol_tokenizer):
    hf_dir = make_tiny_model("gpt2", tmp_path / "gpt2", smol_tokenizer)
    out = tmp_path / "out.gguf"
    proc = run_converter(hf_dir, "--outfile", out)
    assert proc.returncode == 2
    assert "model_type 'gpt2' is not supported" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("out.gguf*"))


def test_missing_model_and_bad_arguments(tmp_path):
    out = tmp_path / "out.gguf"
    proc = run_converter(tmp_path / "nope", "--outfile", out)
    assert proc.returncode == 2 and "nope: no such file or folder" in proc.stderr
    proc = run_converter(tmp_path, "--outfile", out, "--other-type", "Q9_9")
    assert proc.returncode == 2 and "--other-type" in proc.stderr
    assert not out.exists()


def test_python_api_refuses_bad_files_without_crashing(truncated, rank_mismatch, tiny_nq_models, tmp_path):
    """nanoquant.Model raises a clear exception for each bad file. The loads run in a child interpreter, so a
    crash fails this test (with its signal) instead of ending the whole test run."""
    import json
    import subprocess
    import sys

    good = tiny_nq_models["llama"].read_bytes()
    cases = {
        "missing": (tmp_path / "missing.gguf", "FileNotFoundError", "no such model file"),
        "text": (tmp_path / "notes.gguf", "ModelLoadError", "not a GGUF file"),
        "truncated": (truncated, "ModelLoadError", "not within the file bounds"),
        "header-only": (tmp_path / "header-only.gguf", "ModelLoadError", "header-only.gguf"),
        "garbage-after-magic": (tmp_path / "garbage.gguf", "ModelLoadError", "garbage.gguf"),
        "rank-mismatch": (rank_mismatch, "ModelLoadError", "blk.0.attn_q.nq_u"),
    }
    cases["text"][0].write_text("hello, I am not a model\n")
    cases["header-only"][0].write_bytes(good[:24])
    rng = np.random.default_rng(0)
    cases["garbage-after-magic"][0].write_bytes(good[:8] + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    script = """
import json, sys
from nanoquant import Model
out = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        Model(path, n_ctx=128).close()
        out[name] = ["no exception", ""]
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
print(json.dumps(out))
"""
    paths = {name: str(path) for name, (path, _, _) in cases.items()}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(paths)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"the interpreter ended with {proc.returncode}:\n{proc.stderr[-3000:]}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (path, exception, needle) in cases.items():
        kind, message = got[name]
        assert kind == exception, (name, kind, message)
        assert needle in message and str(path) in message, (name, message)
