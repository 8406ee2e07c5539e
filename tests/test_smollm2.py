"""The embedded default model, SmolLM2-135M-Instruct, at 1.0 bpw with a fast setting, runs in patched llama-cli."""
from conftest import run_tool
from nanoquant.fileformat.info import describe


def test_realized_bpw_of_quantized_layers(smol_nq):
    """The default (sensitivity) allocation spends the target's bits within 0.5%, in multiples of 32 ranks, and
    moves them between layers: the ranks are not the method's per-shape rule."""
    info = describe(smol_nq)
    assert len(info.layers) == 30 * 7
    assert 0.995 <= info.bpw_linear <= 1.0, info.bpw_linear
    assert all(l.rank >= 32 and l.rank % 32 == 0 for l in info.layers)
    rule = {(576, 576): 256, (192, 576): 96, (1536, 576): 384, (576, 1536): 384}  # the method's rank rule
    assert sum(l.rank != rule[l.d_out, l.d_in] for l in info.layers) > len(info.layers) // 2


PPL_CHUNKS = 40
PPL_MARGIN = 1.25       # today's file may be this much worse, relative to its teacher, than the table's row
CHAT_TOP1_MARGIN = 0.06


def test_the_file_keeps_the_quality_of_the_tables_fast_row(smol_nq, tmp_path):
    """The fixture is the quality table's "NQ 1.0 (fast preset)" row made again by today's code: its perplexity over
    its F32 teacher's and its chat top-1 on the teacher's answers must stay near the row's (the table's own protocol,
    fewer chunks), so a regression of the method fails CI instead of passing through."""
    from bench import quality
    from bench.common import RESULTS, TEST_TEXT, final_perplexity, read_result
    from conftest import SMOL_GGUF

    rows = {r["method"]: r for r in read_result(RESULTS / "quality-SmolLM2-135M-Instruct.json")["rows"]}
    row, f32_row = rows["NQ 1.0 (fast preset)"], rows["F32"]
    f32 = tmp_path / "F32.gguf"
    assert run_tool("llama-quantize", "--allow-requantize", SMOL_GGUF, f32, "F32").returncode == 0

    def ppl(model):
        proc = run_tool("llama-perplexity", "-m", model, "-f", TEST_TEXT, "-c", "512", "--chunks", str(PPL_CHUNKS),
                        "-t", "2", timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return final_perplexity(proc.stdout + proc.stderr, f"llama-perplexity {model}")

    ratio, table_ratio = ppl(smol_nq) / ppl(f32), row["ppl"] / f32_row["ppl"]
    answers = quality.teacher_answers(f32, quality.CHAT_INSTRUCTIONS, tmp_path, row["chat_protocol"]["max_tokens"])
    top1 = quality.chat_scores(smol_nq, answers)["chat_top1"]
    assert ratio <= PPL_MARGIN * table_ratio, (ratio, table_ratio)
    assert top1 >= row["chat_top1"] - CHAT_TOP1_MARGIN, (top1, row["chat_top1"])


def test_the_demo_shows_both_files_side_by_side(smol_nq, capsys):
    """`make demo`: every question answered by the teacher and by the NanoQuant file, the sizes, speeds and the
    perplexity ratio; the NanoQuant answers are words (llama-cli's chat turn too)."""
    import re

    from conftest import BIN, SMOL_GGUF, TEST_TEXT
    from nanoquant.runtime import demo

    assert demo.main(["--model", str(smol_nq), "--teacher", str(SMOL_GGUF), "--bin", str(BIN),
                      "--text", str(TEST_TEXT)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Perplexity on \d+ chunks of wiki.test.raw: teacher [0-9.]+, NanoQuant [0-9.]+ \([0-9.]+x\)", out)
    assert re.search(r"decodes [0-9.]+x as fast as its teacher", out), out
    for prompt in demo.PROMPTS:
        block = out[out.index(f"Q: {prompt}"):]
        assert re.match(r"Q: .*\n  teacher: +\S.*\n(?: {13}.*\n)*  NanoQuant: +\S", block), block[:600]
    nq_answers = re.findall(r"  NanoQuant: +(.*)", out)
    assert all(len(re.findall(r"[A-Za-z]{2,}", a)) >= 3 for a in nq_answers), nq_answers
    answer = demo.chat_once(BIN, smol_nq, demo.DEFAULT_PROMPT)
    assert len(re.findall(r"[A-Za-z]{2,}", answer)) >= 3, repr(answer)