"""Calibration that matches use: windows start as llama.cpp starts a sequence (BOS where the model asks for one),
conversations in the model's own chat template with answers the teacher writes, and settings from one table."""
import json
import re
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

from conftest import REPO, TINY_METHOD_ARGS, make_tiny_model, run_converter
from nanoquant.convert.calibration import (DEFAULT_CHAT_INSTRUCTIONS, CalibrationError, chat_windows,
                                           read_conversations, read_instructions, text_windows, window_bos)

CONVERSATIONS = [
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
]


def _tiny_gguf_with_bos(tmp_path, tokenizer):
    """A tiny llama as an F32 GGUF whose tokenizer asks for BOS, as Llama, Mistral and Gemma files do (SmolLM2's
    does not). llama.cpp's converter cannot be given a tokenizer that adds BOS here: it recognises pre-tokenizers
    by the ids of a test string, which a leading BOS changes. So the flag is set in the GGUF, which is what
    llama.cpp reads."""
    from gguf import GGUFReader

    hf = make_tiny_model("llama", tmp_path / "hf", tokenizer)
    gguf_path = tmp_path / "tiny-bos.gguf"
    subprocess.run([sys.executable, str(REPO / "vendor/llama.cpp/convert_hf_to_gguf.py"), str(hf), "--outtype", "f32",
                    "--outfile", str(gguf_path)], check=True, capture_output=True)
    field = GGUFReader(gguf_path, "r+").fields["tokenizer.ggml.add_bos_token"]
    field.parts[field.data[0]][0] = True  # in place, as gguf-py's gguf_set_metadata.py does
    return gguf_path


def test_windows_start_with_bos_only_where_the_gguf_asks_for_it(tmp_path, smol_tokenizer):
    from conftest import SMOL_GGUF

    assert window_bos(SMOL_GGUF, smol_tokenizer) is None  # SmolLM2 adds no BOS, and llama.cpp follows the GGUF
    bos = window_bos(_tiny_gguf_with_bos(tmp_path, smol_tokenizer), smol_tokenizer)
    assert bos == smol_tokenizer.bos_token_id
    text = text_windows(smol_tokenizer, DEFAULT_CHAT_INSTRUCTIONS, 3, 64, 0, bos)
    assert text.shape == (3, 64) and (text[:, 0] == bos).all()
    assert (text_windows(smol_tokenizer, DEFAULT_CHAT_INSTRUCTIONS, 3, 64, 0, None)[:, 0] != bos).all()
    chat = chat_windows(smol_tokenizer, CONVERSATIONS, 2, 48, 0, bos)
    assert chat.shape == (2, 48) and (chat[:, 0] == bos).all()


def test_chat_windows_are_multi_turn_conversations_in_the_models_template(smol_tokenizer):
    windows = chat_windows(smol_tokenizer, CONVERSATIONS, 3, 80, 0)
    assert windows.shape == (3, 80)
    text = smol_tokenizer.decode(windows[0])
    opening = smol_tokenizer.apply_chat_template(CONVERSATIONS[0][:1], tokenize=False)[:20]
    assert text.startswith(opening)  # the template's own opening (SmolLM2's default system turn)
    assert text.count("<|im_start|>system") == 1  # one conversation, several turns
    assert text.count("<|im_start|>assistant") >= 2 and "<|im_end|>" in text  # answers end their turns
    assert torch.equal(windows, chat_windows(smol_tokenizer, CONVERSATIONS, 3, 80, 0))  # seeded
    assert not torch.equal(windows, chat_windows(smol_tokenizer, CONVERSATIONS, 3, 80, 1))


def test_bad_conversation_files_name_the_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n" + json.dumps({"turns": []}) + "\n")
    with pytest.raises(CalibrationError, match=r"chat.jsonl:2: expected"):
        read_conversations(path)
    path.write_text("\n")
    with pytest.raises(CalibrationError, match="no conversations"):
        read_conversations(path)
    assert len(read_instructions(DEFAULT_CHAT_INSTRUCTIONS)) >= 300


def test_every_option_sets_a_settings_field_and_the_seed_is_in_one_place(capsys):
    from nanoquant.convert.admm import AdmmSettings
    from nanoquant.convert.pipeline import build_parser
    from nanoquant.convert.reconstruct import DistillSettings, TuneSettings
    from nanoquant.convert.settings import OPTIONS, PRESETS, settings_from_args, value_at

    for stage in (AdmmSettings, TuneSettings, DistillSettings):
        assert "seed" not in {f.name for f in fields(stage)}, stage  # every stage reads ConvertSettings.seed
    for option in OPTIONS:
        for preset in PRESETS.values():
            value_at(preset, option.path)  # raises if an option points nowhere
    args = build_parser().parse_args(["m.gguf", "--outfile", "o.gguf", "--preset", "standard", "--seed", "7",
                                      "--factor-steps", "9", "--mid-scale", "on", "--calib-chat", "none",
                                      "--block-loss", "relative", "--rank-spread", "0"])
    s = settings_from_args(args)
    standard = PRESETS["standard"]
    assert (s.seed, s.tune.factor_steps, s.mid_scale, s.calib_chat, s.tune.loss, s.rank_spread) == \
        (7, 9, True, "none", "relative", 0)
    assert s.admm.iterations == standard.admm.iterations and s.distill == standard.distill
    assert s.rank_scaled == ("admm.iterations",)  # the user set the STE steps: not scaled
    with pytest.raises(SystemExit):
        build_parser().parse_args(["m.gguf", "--outfile", "o.gguf", "--rank-spread", "0.5"])
    assert "--rank-spread: expected 0 (unbounded) or a factor >= 1" in capsys.readouterr().err


def test_conversion_calibrates_on_teacher_answers_with_bos_and_logs_fixed_window_losses(tmp_path, smol_tokenizer):
    source = _tiny_gguf_with_bos(tmp_path, smol_tokenizer)
    out = tmp_path / "nq.gguf"
    args = ("--bpw", "1.0", *TINY_METHOD_ARGS, "--chat-share", "0.5")
    proc = run_converter(source, "--outfile", out, *args, "--keep-work")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout
    assert re.search(r"calibration: 2 windows of valid.txt and 2 of conversations, 256 tokens each, starting with "
                     rf"BOS \(token {smol_tokenizer.bos_token_id}\)", log), log[-3000:]
    assert re.search(r"the teacher answered \d+ instructions", log)
    conversations = read_conversations(tmp_path / "nq.gguf.work" / "chat.jsonl")
    instructions = set(read_instructions(DEFAULT_CHAT_INSTRUCTIONS))
    assert all(c[0]["content"] in instructions and c[1]["role"] == "assistant" for c in conversations)
    # the same fixed windows before and after tuning, and each stage's time, for every block
    for block in (0, 1):
        assert re.search(rf"block {block} \(all linears\): block loss on 4 fixed windows after ADMM [0-9.e+-]+, "
                         r"after STE tuning [0-9.e+-]+", log), log[-3000:]
        assert re.search(rf"block {block}: targets [0-9.]+ s, dense tuning [0-9.]+ s, ADMM [0-9.]+ s, STE tuning", log)
    # --resume reuses the conversations the work folder keeps: no second generation
    again = run_converter(source, "--outfile", tmp_path / "again.gguf", *args, "--work-dir", tmp_path / "nq.gguf.work",
                          "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the teacher answered" not in again.stdout
    assert (tmp_path / "again.gguf").read_bytes() == out.read_bytes()
