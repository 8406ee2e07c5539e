"""Bad input ends in a clear error naming the problem and a non-zero exit: never a crash or a partial file."""

import gguf
import numpy as np
import pytest

from conftest import load_in_child, make_tiny_model, run_converter, run_tool
from nanoquant.fileformat import nq1
from nanoquant.fileformat.writer import rewrite_gguf
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
    def widen(tensors):
        t = next(t for t in tensors if t[0] == "blk.0.attn_q.nq_u")
        d_out, rank = t[1].shape[0], t[1].shape[1] * 8
        t[1] = nq1.pack_signs(np.ones((d_out, rank + 32), dtype=np.float32))
    return rewrite_gguf(tiny_nq_models["llama"], tmp_path_factory.mktemp("bad") / "rank-mismatch.gguf", widen)


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
    got = load_in_child({name: path for name, (path, _, _) in cases.items()})
    for name, (path, exception, needle) in cases.items():
        kind, message = got[name]
        assert kind == exception, (name, kind, message)
        assert needle in message and str(path) in message, (name, message)


def _tiny_llama_folder(tmp_path, smol_tokenizer):
    return make_tiny_model("llama", tmp_path / "hf", smol_tokenizer)


@pytest.mark.parametrize("case", ["bpw-zero", "bpw-high", "windows", "window-tokens", "chat-share", "steps", "lr",
                                  "outfile-folder", "no-tokenizer", "missing-shard", "bad-config", "query-scale"])
def test_converter_refuses_bad_input_before_any_work(case, tmp_path, smol_tokenizer):
    """Each bad input: exit 2 in seconds, one line naming the argument or file, no output, no work folder."""
    import json
    import time

    hf = _tiny_llama_folder(tmp_path, smol_tokenizer)
    out = tmp_path / "out" / "model.gguf"
    args, needle = {
        "bpw-zero": (["--bpw", "0"], "--bpw"),
        "bpw-high": (["--bpw", "40"], "--bpw"),
        "windows": (["--calib-windows", "0"], "--calib-windows"),
        "window-tokens": (["--calib-window-tokens", "4"], "--calib-window-tokens"),
        "chat-share": (["--chat-share", "1.5"], "--chat-share"),
        "steps": (["--factor-steps", "-1"], "--factor-steps"),
        "lr": (["--distill-lr", "nan"], "--distill-lr"),
        "outfile-folder": ([], "is a folder"),
        "no-tokenizer": ([], "no tokenizer"),
        "missing-shard": ([], "safetensors shards"),
        "bad-config": ([], "config.json"),
        "query-scale": ([], "query_pre_attn_scalar 256"),
    }[case]
    if case == "outfile-folder":
        out.mkdir(parents=True)
    if case == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer.model"):
            (hf / name).unlink(missing_ok=True)
    if case == "missing-shard":
        index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model.safetensors",
                                                "lm_head.weight": "model-00002-of-00002.safetensors"}}
        (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    if case == "bad-config":
        (hf / "config.json").write_text("{not json")
    if case == "query-scale":  # a Gemma 3 config whose attention scale llama.cpp's graph would not use (head_dim 32)
        config = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps({**config, "model_type": "gemma3_text",
                                                    "query_pre_attn_scalar": 256}))
    start = time.time()
    proc = run_converter(hf, "--outfile", out, *args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert time.time() - start < 30  # in seconds, not after calibration (< 5 s measured; imports dominate)
    assert not out.is_file() and not list(tmp_path.rglob("*.work")) and not list(tmp_path.rglob("*.partial"))


def test_converter_failure_before_progress_leaves_no_work_folder(tmp_path, smol_tokenizer):
    """A run that fails in calibration (here: a calibration text shorter than one window) removes its work folder."""
    hf = _tiny_llama_folder(tmp_path, smol_tokenizer)
    short = tmp_path / "short.txt"
    short.write_text("only a few words\n")
    out = tmp_path / "model.gguf"
    proc = run_converter(hf, "--outfile", out, "--calib", short, "--calib-chat", "none", "--calib-windows", "2",
                         "--calib-window-tokens", "64", timeout=600)
    assert proc.returncode == 2 and "short.txt" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "short.txt"]


def test_writer_refuses_a_non_finite_scale(tiny_nq_models, tmp_path):
    """The converter's last step: a diverged scale stops the write, and nothing lands under the output's name."""
    from nanoquant.fileformat.writer import NQLayerTensors, TensorTypes, write_nq_gguf

    reader = gguf.GGUFReader(tiny_nq_models["llama"])
    tensors = {t.name: t for t in reader.tensors}
    d_in = int(tensors["blk.0.attn_q.nq_v"].shape[0])
    d_out = int(tensors["blk.0.attn_q.nq_u"].shape[1])
    rank = 32
    s_post = np.ones(d_out, dtype=np.float32)
    s_post[0] = np.inf
    layer = NQLayerTensors(base="blk.0.attn_q", u=np.ones((d_out, rank), np.float32),
                           v=np.ones((rank, d_in), np.float32), s_pre=np.ones(d_in, np.float32), s_post=s_post,
                           replaces=("blk.0.attn_q",))
    out = tmp_path / "diverged.gguf"
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.nq_s_post has 1 non-finite"):
        write_nq_gguf(tiny_nq_models["llama"], out, [layer], TensorTypes.every(gguf.GGMLQuantizationType.F32), {})
    assert not out.exists() and not (tmp_path / "diverged.gguf.partial").exists()


def _format_variants(src, folder):
    """The tiny file without its format version key, with version 2, and with one s_pre entry of 3e38 (finite)."""
    def set_version(reader):
        reader.fields[nq1.KEY_FORMAT_VERSION].parts[3][0] = 2
    unknown = folder / "version-2.gguf"
    unknown.write_bytes(src.read_bytes())
    set_version(gguf.GGUFReader(unknown, "r+"))

    def overflow(tensors):
        t = next(t for t in tensors if t[0] == "blk.0.attn_q.nq_s_pre")
        t[1] = t[1].copy()
        t[1][0] = 3e38
    return {
        "missing": (rewrite_gguf(src, folder / "no-version.gguf", lambda t: None,
                                 drop_keys=frozenset({nq1.KEY_FORMAT_VERSION})), nq1.KEY_FORMAT_VERSION),
        "unknown": (unknown, "version"),
        "overflow": (rewrite_gguf(src, folder / "overflow.gguf", overflow), "blk.0.attn_q.nq_s_pre"),
    }


def test_the_format_version_and_overflowing_scales_are_refused_everywhere(tiny_nq_models, tmp_path, eval_text):
    """A file of a format version this build does not read, one without the key, and one whose scale is finite but
    beyond F16 (every logit NaN if it loaded): refused by llama.cpp's tools, nanoquant.Model and the Python readers,
    each with its reason."""
    from nanoquant.fileformat.info import describe

    src = tiny_nq_models["llama"]
    assert gguf.GGUFReader(src).fields[nq1.KEY_FORMAT_VERSION].contents() == nq1.FORMAT_VERSION
    cases = _format_variants(src, tmp_path)
    reasons = {"missing": f"no '{nq1.KEY_FORMAT_VERSION}' key", "unknown": "NanoQuant format version is 2; this "
               "build reads version 1", "overflow": "'blk.0.attn_q.nq_s_pre' has a scale of 3e+38"}
    for name, (path, _) in cases.items():
        for tool in TOOLS:
            _assert_clean_failure(_load_with_tool(tool, path, eval_text), reasons[name])
    got = load_in_child({name: path for name, (path, _) in cases.items()})
    for name, (path, needle) in cases.items():
        assert got[name][0] != "no exception" and reasons[name] in got[name][1], (name, got[name])
        for reader in (describe, load_reference_model):
            with pytest.raises(NQFormatError, match=needle):
                reader(path)


def test_generation_raises_when_the_logits_are_not_finite(tiny_nq_models, tmp_path):
    """Scales within the accepted range can still overflow together (every s_pre and s_post at 60000): the file
    loads, and nanoquant.Model raises instead of sampling from NaN logits into an empty string."""
    from nanoquant import Model

    def huge(tensors):
        for t in tensors:
            if t[0].endswith((".nq_s_pre", ".nq_s_post")):
                t[1] = np.full_like(t[1], 60000.0)
    path = rewrite_gguf(tiny_nq_models["llama"], tmp_path / "huge-scales.gguf", huge)
    with Model(path, n_ctx=128) as model:
        assert not np.isfinite(model.logits(model.tokenize("Hello"))[-1]).all()
        with pytest.raises(RuntimeError, match="logits .* are not finite"):
            model.generate("Hello", max_tokens=4, temperature=0)
