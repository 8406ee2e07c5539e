"""The pieces bench/quality.py relies on: bits of the decoder linears counted from a file, the per-row sign baseline,
the chat metric."""
import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, make_tiny_model, run_tool
from bench.baselines import row_sign, write_sign_baseline
from nanoquant.fileformat.info import decoder_linear_bits, decoder_linear_shapes, describe
from nanoquant.reference import nq_layers, open_gguf


def tiny_f32_gguf(tmp_path, tokenizer, seed=0, block_gain=None):
    """A tiny random llama from transformers, as an F32 GGUF by llama.cpp's own converter. block_gain scales the
    blocks' output projections: at initialisation the residual stream is the input embedding, which the tied head
    scores highest, so every random model only repeats its last token and two seeds answer alike."""
    hf = make_tiny_model("llama", tmp_path / "hf", tokenizer, seed=seed)
    if block_gain is not None:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    param.mul_(block_gain)
        model.save_pretrained(hf)
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
    from bench import decode

    f32 = tiny_f32_gguf(tmp_path, smol_tokenizer)
    base = {t.name[: -len(".weight")]: np.asarray(t.data, dtype=np.float64) for t in open_gguf(f32).tensors}
    rng = np.random.default_rng(0)
    rms = lambda a: np.sqrt(np.mean(np.square(a)))  # noqa: E731
    for shared_v, n_layers in (("none", 14), ("qkv", 10)):
        nq = decode.synthetic_nq(f32, tmp_path / f"nq-{shared_v}.gguf", 1.0, "q8_0", shared_v)
        layers = nq_layers(open_gguf(nq), nq)
        assert len(layers) == n_layers and ("blk.0.attn_qkv" in layers) == (shared_v == "qkv")
        for name, layer in layers.items():
            x = rng.standard_normal((layer.v.shape[1], 64))
            members = [f"{name[:-3]}{m}" for m in "qkv"] if name.endswith("attn_qkv") else [name]
            dense = np.concatenate([base[m] for m in members]) @ x
            low_rank = layer.s_post[:, None] * (layer.u @ (layer.v @ (layer.s_pre[:, None] * x)))
            for start, stop in _member_rows([base[m].shape[0] for m in members]):  # each member its base's size
                assert 0.8 < rms(low_rank[start:stop]) / rms(dense[start:stop]) < 1.25, name
        assert run_tool("llama-bench", "-m", nq, "-p", "8", "-n", "4", "-r", "1", "-t", "2").returncode == 0


def _member_rows(rows: list[int]) -> list[tuple[int, int]]:
    bounds = np.cumsum([0, *rows])
    return list(zip(bounds[:-1], bounds[1:]))


def test_convert_seconds_come_from_the_converters_log(tmp_path):
    from bench.quality import converter_seconds

    model = tmp_path / "NQ-1.0.gguf"
    assert converter_seconds(model) is None  # no log: the caller keeps its own clock
    model.with_suffix(".log").write_text(
        "blocks: 1129 s\nwrote /x/NQ-1.0.gguf (45,152,320 bytes) in 1919 s, peak RSS 3219 MiB\n")
    assert converter_seconds(model) == 1919.0


def test_another_chunk_count_gets_its_own_table(tmp_path, monkeypatch):
    from bench import quality

    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    model = tmp_path / "Model.Q4_1.gguf"
    model.write_bytes(b"")
    default = quality.Bench(model, quality.DEFAULT_CHUNKS, 2, "standard")
    other = quality.Bench(model, 40, 2, "standard")
    assert default.json_path.name == "quality-Model.json" and other.json_path.name == "quality-Model-40chunks.json"
    assert default.protocol != other.protocol


def test_rows_made_with_other_settings_than_their_command_gives_now_are_named():
    from bench import quality
    from nanoquant.convert.output import settings_record
    from nanoquant.convert.settings import PRESETS

    row = quality.Row("ablation 1.0: seed 1", "nq", bpw=1.0, converter_args=("--seed", "1"))
    standard = PRESETS["standard"]
    made = json.loads(settings_record(standard))
    made["seed"] = 1
    assert quality.settings_drift(row, "standard", made) == []
    older = copy.deepcopy(made)  # the nested records too: the edits below must not reach `made`
    older.update(calib_windows=standard.calib_windows // 2)
    older["admm"]["iterations"] = 7
    del older["shared_v"], older["tune"]["loss"]  # settings added later: their absence meant today's defaults
    del older["mid_scale"]  # one whose absence means nothing known
    # ADMM iterations follow the ranks (rank-scaled), so a file's count says nothing about its command
    assert quality.settings_drift(row, "standard", older) == [
        f"calib_windows {standard.calib_windows // 2} (now {standard.calib_windows})",
        f"mid_scale not recorded (now {standard.mid_scale})"]
    assert quality.settings_drift(quality.Row("Q4_0", "llama", "Q4_0"), "standard", None) == []
    # the spread bound came later: a sensitivity file without it was unbounded; a uniform one names only the allocation
    unbounded = copy.deepcopy(made)
    del unbounded["rank_spread"]
    assert quality.settings_drift(row, "standard", unbounded) == [f"rank_spread 0 (now {standard.rank_spread})"]
    unbounded["rank_allocation"] = "uniform"
    assert quality.settings_drift(row, "standard", unbounded) == ["rank_allocation uniform (now sensitivity)"]


def test_decode_table_gives_the_file_size_ratio_and_names_other_heads(capsys):
    from bench import decode

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
    from bench import kernels

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


CHAT_INSTRUCTIONS = ["Name a colour.", "What is two plus two?", "Write one sentence about the sea."]
THREADS = 1  # two llama.cpp threads on a busy 2-core machine wait on each other: 60x slower decoding than one


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory, smol_tokenizer):
    """Two tiny random llamas of other seeds (F32 GGUFs with SmolLM2's tokenizer and chat template) that do not just
    repeat their last token, and a short instruction file."""
    work = tmp_path_factory.mktemp("chat")
    teacher = tiny_f32_gguf(work / "teacher", smol_tokenizer, seed=0, block_gain=100.0)
    other = tiny_f32_gguf(work / "other", smol_tokenizer, seed=1, block_gain=100.0)
    instructions = work / "instructions.txt"
    instructions.write_text("\n".join(CHAT_INSTRUCTIONS) + "\n\n")
    return teacher, other, instructions


def bench_quality():
    from bench import quality
    return quality


def test_chat_prompt_is_the_one_model_chat_decodes(chat_models):
    quality = bench_quality()
    from nanoquant import Model

    teacher, _, _ = chat_models
    with Model(teacher, n_ctx=512, n_threads=THREADS) as m:
        prompt = quality.chat_prompt_ids(m, "Name a colour.")
        assert "<|im_start|>user\nName a colour.<|im_end|>" in m.apply_chat_template([{"role": "user",
                                                                                         "content": "Name a colour."}])
        assert m.detokenize(prompt, special=True).endswith("<|im_start|>assistant\n")
        ids = quality.greedy_ids(m, prompt, 12)
        # the ids sampled are the text Model.chat writes
        assert m.detokenize(ids) == m.chat([{"role": "user", "content": "Name a colour."}], max_tokens=12,
                                           temperature=0)
        assert 1 <= len(ids) <= 12


def test_chat_metric_scores_the_teacher_against_itself_and_another_model(chat_models, tmp_path, monkeypatch):
    quality = bench_quality()
    teacher, other, instructions = chat_models
    answers = quality.teacher_answers(teacher, instructions, tmp_path, max_tokens=16, threads=THREADS)
    assert [a["instruction"] for a in answers["answers"]] == CHAT_INSTRUCTIONS
    assert all(1 <= len(a["answer_ids"]) <= 16 for a in answers["answers"])
    cache = list(tmp_path.glob("chat-teacher-*.json"))
    assert len(cache) == 1 and json.loads(cache[0].read_text()) == answers

    # the second call reads the cache: nothing is generated
    def no_generation(*args, **kwargs):
        raise AssertionError("the cached teacher answers were generated again")
    monkeypatch.setattr(quality, "greedy_ids", no_generation)
    assert quality.teacher_answers(teacher, instructions, tmp_path, max_tokens=16, threads=THREADS) == answers
    monkeypatch.undo()
    # other settings are another cache entry
    quality.teacher_answers(teacher, instructions, tmp_path, max_tokens=4, threads=THREADS)
    assert len(list(tmp_path.glob("chat-teacher-*.json"))) == 2

    own = quality.chat_scores(teacher, answers, threads=THREADS, own_tokens=8)
    assert own["chat_top1"] >= 0.95 and math.isfinite(own["chat_ppl"])
    assert own["chat_tokens"] == sum(len(a["answer_ids"]) for a in answers["answers"])
    assert 0 <= own["chat_answers"] <= own["chat_instructions"] == 3 and len(own["chat_samples"]) == 3
    stranger = quality.chat_scores(other, answers, threads=THREADS, own_tokens=8)
    assert stranger["chat_top1"] < own["chat_top1"] and stranger["chat_ppl"] > own["chat_ppl"]


def test_talks_counts_answers_that_hold_a_word():
    quality = bench_quality()
    assert quality.talks(" Blue is a colour.") and quality.talks("ok")
    assert not any(map(quality.talks, ["", "   \n", "1 + 1 = 2", "?? !! ..", "a"]))


def test_calibration_instructions_are_never_the_evaluation_set(tmp_path, monkeypatch):
    quality = bench_quality()
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("Tell me a joke.\nName a colour.\n")
    monkeypatch.setattr(quality, "CHAT_CALIBRATION", calibration)
    with pytest.raises(ValueError, match="not an evaluation set"):
        quality.read_instructions(calibration)
    shared = tmp_path / "eval.txt"
    shared.write_text("What is two plus two?\nName a colour.\n")
    with pytest.raises(ValueError, match="also in calibration.txt"):
        quality.read_instructions(shared)
    shared.write_text("What is two plus two?\n")
    assert quality.read_instructions(shared) == ["What is two plus two?"]


def test_cached_rows_get_the_chat_metric_without_being_scored_again(chat_models, tmp_path, monkeypatch):
    """Rows of an older table keep their PPL; only the chat numbers are added, as ref_rel_diff once was."""
    quality = bench_quality()
    teacher, _, instructions = chat_models
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    bench = quality.Bench(teacher, quality.DEFAULT_CHUNKS, THREADS, "standard", instructions, 16)
    f32 = bench.f32()
    old = {"method": "F32", "bpw_linear": 32.0, "bpw_file": 32.1, "size_bytes": f32.stat().st_size, "ppl": 9.5,
           "kld": 0.0, "top1": 1.0, "convert_s": None, "ref_rel_diff": None, "ref_protocol": None,
           "sha256": quality.sha256(f32), "protocol": bench.protocol, "note": "", "machine": "M",
           "conversion_settings": None}
    bench.rows = [dict(old)]

    def no_scoring(*args, **kwargs):
        raise AssertionError("a cached row was scored again")
    monkeypatch.setattr(bench, "score", no_scoring)
    row = bench.evaluate(quality.ROW_NAMES["F32"])
    assert row["ppl"] == 9.5 and row["chat_top1"] >= 0.95 and math.isfinite(row["chat_ppl"])
    assert row["chat_protocol"]["max_tokens"] == 16 and row["chat_protocol"]["teacher"] == "F32.gguf"
    saved = json.loads(bench.json_path.read_text())
    assert saved["meta"]["command"] and saved["meta"]["commit"] and saved["rows"][0]["chat_top1"] == row["chat_top1"]
    table = bench.json_path.with_suffix(".md").read_text()
    assert "| chat_top1 | chat_ppl | chat_answers |" in table
    assert f"| {row['chat_top1']:.3f} | {row['chat_ppl']:.2f} | {row['chat_answers']}/3 |" in table

    # scored once: a second evaluation under the same protocol finds it complete
    monkeypatch.setattr(quality, "chat_scores", no_scoring)
    assert bench.evaluate(quality.ROW_NAMES["F32"])["chat_top1"] == row["chat_top1"]


def test_an_answer_is_right_when_its_first_sentence_holds_an_accepted_word():
    quality = bench_quality()
    right = quality.answer_right
    assert right("The capital of Ireland is Dublin, on the east coast.", ["dublin"])
    assert right("Sure! The capital of Ireland is Dublin.", ["dublin"])  # a short opener does not end the head
    assert right("2 + 2 = 4", ["4", "four"]) and right("It has four legs.", ["4", "four"])
    assert right("The extension is `.py`.", [r"\.?py"])
    assert not right("A year is approximately 365 days. So 365 / 12 = 30 a month.", ["12", "twelve"])
    assert not right("The planet we live on is Kepler-41b, a super-Earth.", ["earth"])
    assert not right("10 - 4 = 12.", ["6", "six"]) and not right("", ["6"])
    assert not right("The answer is 24.", ["4"])  # a number inside another is not the answer
    assert len(quality.answer_head("word " * 200)) == quality.ANSWER_WINDOW


def test_the_answer_questions_are_the_projects_own_and_not_calibration(tmp_path, monkeypatch):
    quality = bench_quality()
    questions = quality.read_questions(quality.ANSWER_QUESTIONS)
    assert len(questions) >= 40 and len({q["question"] for q in questions}) == len(questions)
    evaluation = set((REPO / "data" / "chat" / "eval-instructions.txt").read_text().splitlines())
    assert not {q["question"] for q in questions} & evaluation
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(questions[3]["question"] + "\n")
    monkeypatch.setattr(quality, "CHAT_CALIBRATION", calibration)
    with pytest.raises(ValueError, match="also in calibration.txt"):
        quality.read_questions(quality.ANSWER_QUESTIONS)


def test_each_model_has_its_table_name_rows_and_chunks():
    quality = bench_quality()
    qwen = REPO / "models" / "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"
    assert quality.model_name(qwen) == "Qwen2.5-Coder-1.5B-Instruct"
    assert quality.model_name(quality.DEFAULT_MODEL) == "SmolLM2-135M-Instruct"
    profile = quality.PROFILES["Qwen2.5-Coder-1.5B-Instruct"]
    rows = {r.method: r for r in profile.rows}
    assert profile.chunks == 40 and rows["Q2_K"].imatrix and rows["IQ1_S"].imatrix and not rows["Q4_0"].imatrix
    assert {"NQ 2.0", "NQ 1.0", "NQ 0.55", "NQ 1.0 (fast preset)", "Q1_0", "TQ1_0"} <= set(rows)
    smol = {r.method for r in quality.PROFILES["SmolLM2-135M-Instruct"].rows}
    assert {"NQ 0.55 (fast preset)", "NQ 2.0 (fast preset)"} <= smol
