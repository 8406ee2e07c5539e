"""The pieces bench/quality.py relies on: bits of the decoder linears counted from a file, the per-row sign baseline."""
import importlib.util
import subprocess
import sys

import numpy as np

from conftest import REPO, make_tiny_model
from nanoquant.baselines import row_sign, write_sign_baseline
from nanoquant.fileinfo import decoder_linear_bits, decoder_linear_shapes, describe
from nanoquant.reference import nq_layers, open_gguf


def tiny_f32_gguf(tmp_path, tokenizer):
    """A tiny random llama from transformers, as an F32 GGUF by llama.cpp's own converter."""
    hf = make_tiny_model("llama", tmp_path / "hf", tokenizer)
    f32 = tmp_path / "f32.gguf"
    subprocess.run([sys.executable, str(REPO / "vendor/llama.cpp/convert_hf_to_gguf.py"), str(hf), "--outtype", "f32",
                    "--outfile", str(f32)], check=True, capture_output=True)
    return f32


def test_row_sign_is_the_l2_optimal_row_binarisation():
    w = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    b = row_sign(w)
    assert np.array_equal(np.sign(b), np.sign(w))
    for row, approx in zip(w, b):  # the best alpha for alpha * sign(row) is mean |row|
        alphas = np.linspace(0.5, 1.5, 101) * np.abs(row).mean()
        errors = [np.sum((row - a * np.sign(row)) ** 2) for a in alphas]
        assert np.isclose(abs(approx[0]), alphas[int(np.argmin(errors))], rtol=0.011)


def test_sign_baseline_and_linear_bits(tmp_path, smol_tokenizer, tiny_nq_models):
    f32 = tiny_f32_gguf(tmp_path, smol_tokenizer)
    bits, weights = decoder_linear_bits(f32)
    assert bits == 32 * weights and len(decoder_linear_shapes(f32)) == 14
    out = tmp_path / "sign.gguf"
    assert write_sign_baseline(f32, out) == 14
    bits, weights = decoder_linear_bits(out)
    assert bits == 16 * weights  # stored as F16 for evaluation
    t = next(t for t in open_gguf(out).tensors if t.name == "blk.0.ffn_up.weight")
    values = np.asarray(t.data, dtype=np.float32)
    assert np.allclose(np.abs(values), np.abs(values[:, :1]))  # one magnitude per row
    nq = tiny_nq_models["llama"]
    bits, weights = decoder_linear_bits(nq)
    assert np.isclose(bits / weights, describe(nq).bpw_linear)


def test_random_sign_files_give_each_layer_its_base_layers_output_size(tmp_path, smol_tokenizer):
    """bench/decode.py's speed-only NQ files: other ops (attention's exp above all) must see activations of the base
    model's size, or they run at another speed than in the types compared."""
    sys.path.insert(0, str(REPO / "bench"))
    import decode

    f32 = tiny_f32_gguf(tmp_path, smol_tokenizer)
    base = {t.name[: -len(".weight")]: np.asarray(t.data, dtype=np.float64) for t in open_gguf(f32).tensors}
    nq = decode.synthetic_nq(f32, tmp_path / "nq.gguf", 1.0, "q8_0")
    layers = nq_layers(open_gguf(nq), nq)
    assert len(layers) == 14
    rng = np.random.default_rng(0)
    rms = lambda a: np.sqrt(np.mean(np.square(a)))  # noqa: E731
    for name, layer in layers.items():
        x = rng.standard_normal((layer.v.shape[1], 64))
        dense = base[name] @ x
        low_rank = layer.s_post[:, None] * (layer.u @ (layer.v @ (layer.s_pre[:, None] * x)))
        assert 0.8 < rms(low_rank) / rms(dense) < 1.25, name


def test_convert_seconds_come_from_the_converters_log(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from quality import converter_seconds

    model = tmp_path / "NQ-1.0.gguf"
    assert converter_seconds(model) is None  # no log: the caller keeps its own clock
    model.with_suffix(".log").write_text(
        "blocks: 1129 s\nwrote /x/NQ-1.0.gguf (45,152,320 bytes) in 1919 s, peak RSS 3219 MiB\n")
    assert converter_seconds(model) == 1919.0


def test_another_chunk_count_gets_its_own_table(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "bench"))
    import quality

    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    model = tmp_path / "Model.Q4_1.gguf"
    model.write_bytes(b"")
    default = quality.Bench(model, quality.DEFAULT_CHUNKS, 2, "standard")
    other = quality.Bench(model, 40, 2, "standard")
    assert default.json_path.name == "quality-Model.json" and other.json_path.name == "quality-Model-40chunks.json"
    assert default.protocol != other.protocol


def test_decode_table_gives_the_file_size_ratio_and_names_other_heads(capsys):
    sys.path.insert(0, str(REPO / "bench"))
    import decode

    def rows(name, size, tg):
        return [dict(model="m", type=name, file=f"{name}.gguf", file_bytes=size, head="q4_0", bpw_linear=1.0,
                     threads=1, test=test, tokens_per_s=tps, samples=[tps], machine="M")
                for test, tps in (("pp128", 3 * tg), ("tg64", tg))]

    table = decode.markdown(rows("NQ-1.0", 100, 30.0) + rows("Q4_0", 287, 10.0))
    assert "Heads: Q4_0." in table and "| m | Q4_0 | 1.000 | 1 | 30.0 | 10.0 | 3.00 | 3.00 | 2.87 |" in table
    # the default head keeps the historical file names; another head gets its own files and results
    assert decode.head_suffix("q8_0") == "" and decode.head_suffix("q4_0") == "-head-q4_0"
    try:
        decode.main(["--head", "q9_9"])
    except SystemExit as stop:
        assert stop.code == 2
    else:
        raise AssertionError("an unknown --head type must stop the benchmark")
    assert "--head: unknown ggml type 'q9_9'" in capsys.readouterr().err


def test_kernel_table_and_the_memory_streaming_shapes():
    # by file: tests/kernels/ (the C kernel tests) would shadow a plain `import kernels`
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "bench" / "kernels.py")
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)

    # the stream group: only NQ and Q4_0, batch 1, enough copies to leave a 32 MiB cache behind, its own label
    stream = list(kernels.configs(["stream"], [1, 2], [1, 128]))
    assert {c["type"] for c in stream} == set(kernels.STREAM_TYPES) and {c["batch"] for c in stream} == {1}
    assert all(c["copies"] == kernels.COPIES["stream"] and c["shape"].endswith("copies") for c in stream)
    nq = stream[0]
    assert nq["type"] == "NQ-1.0" and nq["copies"] * nq["bpw"] * nq["d_out"] * nq["d_in"] / 8 >= 2 * 32 << 20

    def row(shape, type_name, us):
        return dict(shape=shape, threads=1, batch=1, type=type_name, median_us=us)

    table = kernels.markdown({"read_bandwidth_gbs": {"1": 30.0}, "machine": "M",
                              "rows": [row("64x64", "NQ-1.0", 2.0), row("64x64", "NQ-0.55", 1.0),
                                       row("64x64", "Q4_0", 9.0), row("64x64", "IQ1_S", 20.0)]})
    assert "Machine: M; numpy read 1 thread(s) 30.0 GB/s." in table
    assert "| 64x64 | 1 | 1 | 2.0 | 1.0 | 9.0 | 4.50 | - | 10.00 | - |" in table
