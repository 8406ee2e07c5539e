"""Quality table: NanoQuant against llama.cpp's own formats, all scored by the patched llama-perplexity.

    .venv/bin/python bench/quality.py [MODEL] [--chunks N] [--rows ROW ...] [--chat-instructions FILE]

MODEL: the teacher GGUF (or HF folder); SmolLM2-135M-Instruct unless told. A model named in PROFILES has its own
rows and chunk count (SmolLM2: every row, 150 chunks; Qwen2.5-Coder-1.5B-Instruct: llama.cpp's types from 8 bits
down to its 1-bit ones and the NanoQuant presets, 40 chunks); another model gets every row and 150 chunks.
Protocol: WikiText-2 test raw, ctx 512, the first `--chunks` chunks (the profile's unless told; another count writes
its own quality-<model>-<N>chunks table), 2 threads. `kld` is the mean
KL divergence to the F32 model's token distributions (llama-perplexity --kl-divergence) and `top1` the share of
positions where both pick the same top token. llama.cpp's importance-matrix types take an imatrix made by
llama-imatrix on the calibration text (WikiText-2 validation), never on the test text.

Every NanoQuant row is also scored by the Python reference forward (nanoquant.reference, gguf-py + torch, no
llama.cpp code) on the first REF_CHUNKS chunks; `ref_rel_diff` is |PPL(llama) - PPL(python)| / PPL(python) there.
Both sides score llama.cpp's token ids, and llama-perplexity keeps its KV cache in F32 for this check as the Python
forward does: the check is about the file and the NQ kernels, and an F16 cache alone moved a fragile model's PPL
(the fast preset's, 8 chunks) by 6% while changing nothing else.

Every row also gets a chat metric against the same teacher: the F32 model's greedy answers (CHAT_MAX_TOKENS tokens
at most, ending with its end-of-turn token when it writes one) to the evaluation instructions
(data/chat/eval-instructions.txt; never the converter's calibration list) under the GGUF's chat template, made once
and cached in bench/results/<model>/chat-teacher-<hash>.json. Each file is scored teacher-forced on those answers:
`chat_top1` is the share of answer tokens where its argmax is the teacher's token, `chat_ppl` exp of the mean NLL of
the teacher's tokens; `chat_answers` counts its own greedy answers (CHAT_OWN_TOKENS tokens) that hold a word.

The answer metric: short questions with accepted answers (data/chat/answer-questions.jsonl, the project's own,
disjoint from the calibration instructions), asked greedily through the chat template; `answers_right` counts the
answers whose first sentence (answer_head) holds an accepted answer as a word (case-insensitive).

`file_bytes` is the whole file; `convert_s` and `peak_rss_mib` what making the file took (the NanoQuant converter's own
log; llama-quantize's process, without the imatrix it reads).

Every row is cached in bench/results/quality-<model>.json under the sha256 of its file and the protocol, so the table
can be completed over several runs (files live in bench/results/<model>/, git-ignored). Writes the .json, a .md table
and a Pareto plot (PPL against bpw_linear) as .png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from nanoquant.convert.calibration import DEFAULT_CHAT_INSTRUCTIONS
from nanoquant.convert.output import settings_record
from nanoquant.convert.pipeline import build_parser
from nanoquant.fileformat.info import decoder_linear_bits, decoder_linear_shapes, describe
from nanoquant.convert.settings import settings_from_args

from bench.common import (BIN, CALIB_TEXT, DEFAULT_MODEL, REPO, RESULTS, TEST_TEXT, final_perplexity, finish,
                          git_commit, machine, meta, partial, read_result, run, write_result)

DEFAULT_CHUNKS = 150
REF_CHUNKS = 8     # chunks scored twice, by llama-perplexity and by the Python reference forward
REF_TOLERANCE = 0.01
REF_PROTOCOL = "llama-tokenize ids, F32 KV cache"  # both sides score the same token ids with F32 keys and values
REF_KV_F32 = ["-ctk", "f32", "-ctv", "f32", "-fa", "off"]
CHAT_INSTRUCTIONS = REPO / "data" / "chat" / "eval-instructions.txt"
CHAT_CALIBRATION = DEFAULT_CHAT_INSTRUCTIONS  # the converter's: never scored on
CHAT_MAX_TOKENS = 128   # the teacher's answers, the text every file is scored on
CHAT_OWN_TOKENS = 48    # each file's own greedy answers, only for the "does it talk" count and the samples
CHAT_SAMPLES = 3        # own answers kept in the row, for the README
CHAT_SAMPLE_CHARS = 200
CHAT_N_CTX = 2048       # instruction + template + answer; a longer one is an error, not a silently cut answer
ANSWER_QUESTIONS = REPO / "data" / "chat" / "answer-questions.jsonl"
ANSWER_TOKENS = 48      # a short answer; the verdict reads its first ANSWER_WINDOW characters
ANSWER_WINDOW = 160     # room for "The capital of ... is X." and a worked sum, too little for a list of guesses
ANSWER_MIN_WORDS = 4    # a shorter first sentence ("Sure!", "Great question.") does not end the part that is read


@dataclass(frozen=True)
class Row:
    """One line of the table: how its file is made."""
    method: str
    kind: str                 # "f32", "llama" (llama-quantize TYPE), "nq" (our converter), "sign" (per-row sign)
    llama_type: str = ""
    imatrix: bool = False
    bpw: float = 0.0
    converter_args: tuple[str, ...] = ()
    note: str = ""


# NanoQuant rows use --preset standard; the ablations differ from the NQ row of their bpw in one setting each
# (or from the 32-window row where they say so)
ROWS = [
    Row("F32", "f32"),
    Row("Q8_0", "llama", "Q8_0"),
    Row("Q4_K_M", "llama", "Q4_K_M"),
    Row("Q4_0", "llama", "Q4_0"),
    Row("Q2_K", "llama", "Q2_K"),
    Row("IQ2_XXS", "llama", "IQ2_XXS", imatrix=True),
    Row("IQ1_M", "llama", "IQ1_M", imatrix=True),
    Row("IQ1_S", "llama", "IQ1_S", imatrix=True),
    Row("TQ1_0", "llama", "TQ1_0"),
    Row("Q1_0", "llama", "Q1_0"),
    Row("NQ 2.0", "nq", bpw=2.0),
    Row("NQ 1.5", "nq", bpw=1.5),
    Row("NQ 1.0", "nq", bpw=1.0),
    Row("NQ 0.8", "nq", bpw=0.8),
    Row("NQ 0.55", "nq", bpw=0.55),
    Row("NQ 1.0 (fast preset)", "nq", bpw=1.0, converter_args=("--preset", "fast"),
        note="--preset fast, the make-demo setting; its convert_s is the fast preset's time"),
    Row("NQ 2.0 (fast preset)", "nq", bpw=2.0, converter_args=("--preset", "fast"), note="--preset fast"),
    Row("NQ 0.55 (fast preset)", "nq", bpw=0.55, converter_args=("--preset", "fast"), note="--preset fast"),
    Row("ablation 1.0: per-row sign", "sign", bpw=1.0,
        note="alpha_row * sign(W), stored as F16 for evaluation; bpw_linear is the 1-bit packing's"),
    Row("ablation 1.0: ADMM init only", "nq", bpw=1.0,
        converter_args=("--dense-steps", "0", "--factor-steps", "0", "--distill-steps", "0")),
    Row("ablation 1.0: init + block reconstruction", "nq", bpw=1.0, converter_args=("--distill-steps", "0")),
    Row("ablation 1.0: uniform ranks", "nq", bpw=1.0, converter_args=("--rank-allocation", "uniform")),
    Row("ablation 0.55: uniform ranks", "nq", bpw=0.55, converter_args=("--rank-allocation", "uniform")),
    Row("ablation 1.0: unbounded sensitivity ranks", "nq", bpw=1.0, converter_args=("--rank-spread", "0"),
        note="sensitivity ranks without the spread bound (--rank-spread 0): any layer from rank 32 up"),
    Row("ablation 0.55: unbounded sensitivity ranks", "nq", bpw=0.55, converter_args=("--rank-spread", "0"),
        note="sensitivity ranks without the spread bound (--rank-spread 0): any layer from rank 32 up"),
    Row("ablation 1.0: WikiText-only calibration", "nq", bpw=1.0, converter_args=("--calib-chat", "none")),
    # these two were measured when the standard preset had 32 windows: they keep 32 and compare with the row
    # "ablation 1.0: 32 calibration windows"
    Row("ablation 1.0: shared q/k/v V", "nq", bpw=1.0, converter_args=("--calib-windows", "32", "--shared-v", "qkv"),
        note="q, k and v factorised as one stacked layer (one V, ranks pooled), stored as the fused attn_qkv; "
             "32 calibration windows"),
    Row("ablation 1.0: relative block loss", "nq", bpw=1.0,
        converter_args=("--calib-windows", "32", "--block-loss", "relative"),
        note="block reconstruction on each token's error relative to its target's mean square (--block-loss relative);"
             " 32 calibration windows"),
    # the calibration draw: how far the 1.0 row moves with its seed, and with half the windows (the standard preset
    # had 32 until the two 32-window draws below came out 25% apart)
    Row("ablation 1.0: seed 1", "nq", bpw=1.0, converter_args=("--seed", "1"),
        note="the NQ 1.0 row with --seed 1: another calibration draw, ADMM start and tuning order (run-to-run spread)"),
    Row("ablation 1.0: 32 calibration windows", "nq", bpw=1.0, converter_args=("--calib-windows", "32"),
        note="32 windows of 512 tokens instead of 64 (half conversations, as in the default)"),
    Row("ablation 1.0: 32 calibration windows, seed 1", "nq", bpw=1.0,
        converter_args=("--calib-windows", "32", "--seed", "1"),
        note="both of the rows above at once: how far a 32-window draw moves with the seed"),
    Row("ablation 0.55: 32 calibration windows", "nq", bpw=0.55, converter_args=("--calib-windows", "32"),
        note="the NQ 0.55 row with 32 windows of 512 tokens instead of 64"),
    Row("ablation 0.55: seed 1", "nq", bpw=0.55, converter_args=("--seed", "1"),
        note="the NQ 0.55 row with --seed 1 (run-to-run spread at 0.55)"),
]
ROW_NAMES = {row.method: row for row in ROWS}


@dataclass(frozen=True)
class Profile:
    """A model's table: its chunk count and rows (the rows of another model, or a row's variant for this model)."""
    chunks: int
    rows: tuple[Row, ...]


# Qwen2.5-Coder-1.5B-Instruct: every linear row is a multiple of 256, so llama.cpp's K- and I-quants apply at their
# real size; its 2-bit and smaller types (Q2_K too) get the imatrix, as a user makes them
_QWEN15_ROWS = ("F32", "Q8_0", "Q4_K_M", "Q4_0", "Q2_K", "IQ2_XXS", "IQ1_M", "IQ1_S", "Q1_0", "TQ1_0", "NQ 2.0",
                "NQ 1.0", "NQ 0.55", "NQ 1.0 (fast preset)")
# the token embedding's and the head's types, on the fast 1.0 conversion (written from its kept work folder); the
# NQ rows have the defaults (embedding Q2_K, head Q4_K); Q5_K is llama-quantize's head in its 1-2-bit mixes
_TYPE_ROWS = tuple(
    Row(f"ablation 1.0 (fast preset): embedding {embd}, head {head}", "nq", bpw=1.0,
        converter_args=("--preset", "fast", "--token-embedding-type", embd, "--output-tensor-type", head),
        note=f"the NQ 1.0 (fast preset) conversion with the token embedding in {embd} and the output head in {head}")
    for embd, head in (("Q8_0", "Q8_0"), ("Q2_K", "Q8_0"), ("Q2_K", "Q5_K"), ("Q2_K", "Q2_K")))
PROFILES = {
    "SmolLM2-135M-Instruct": Profile(150, tuple(ROWS)),
    "Qwen2.5-Coder-1.5B-Instruct": Profile(40, tuple(
        replace(ROW_NAMES[n], imatrix=True) if ROW_NAMES[n].llama_type in ("Q2_K", "Q1_0") else ROW_NAMES[n]
        for n in _QWEN15_ROWS) + _TYPE_ROWS),
}


def model_name(model: Path) -> str:
    """The table's name of a teacher: a GGUF's name without its type and extension (X.Q4_K_M.gguf -> X)."""
    name = model.name
    if not model.is_dir():
        name = re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
        name = re.sub(r"[.-](F32|F16|BF16|Q[0-9]_[0-9A-Z_]+|IQ[0-9]_[A-Z_]+|TQ[0-9]_0)$", "", name, flags=re.IGNORECASE)
    return name


def profile_for(model: Path) -> Profile:
    return PROFILES.get(model_name(model), Profile(DEFAULT_CHUNKS, tuple(ROWS)))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()








def conversion_args(row: Row, preset: str) -> list[str]:
    return ["--bpw", str(row.bpw), "--preset", preset, *row.converter_args]


def work_key(args: list[str]) -> str:
    """The work folder of a conversion: a digest of the settings it resolves to, leaving out those that only decide
    how the file is written (tensor types), so a row that differs from another in those alone is written from the
    other's kept folder in a minute (the converter checks the folder's identity itself)."""
    from nanoquant.convert.settings import WRITE_ONLY

    record = json.loads(settings_record(settings_from_args(build_parser().parse_args(
        ["model", "--outfile", "out.gguf", *args]))))
    for name in WRITE_ONLY:
        record.pop(name, None)
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


def converter_seconds(model: Path) -> float | None:
    """The conversion time the NanoQuant converter reported in the log next to its file ("wrote ... in N s")."""
    log = model.with_suffix(".log")
    found = re.search(r"\) in (\d+) s, peak RSS", log.read_text()) if log.is_file() else None
    return float(found.group(1)) if found else None


def conversion_cost(model: Path) -> tuple[float, float] | None:
    """(seconds, peak RSS MiB) of the conversion over every run that computed in its work folder, resumed runs and
    the first run of a file written again from a kept folder included (the converter's "conversion:" line)."""
    log = model.with_suffix(".log")
    found = re.search(r"^conversion: (\d+) s, peak RSS (\d+) MiB", log.read_text(), re.M) if log.is_file() else None
    return (float(found.group(1)), float(found.group(2))) if found else None


def written_from_checkpoint(model: Path) -> bool:
    """Whether the converter wrote the file from a kept work folder's finished layers (other tensor types only)."""
    log = model.with_suffix(".log")
    return log.is_file() and "after model reconstruction are checkpointed" in log.read_text()


def converter_peak_mib(model: Path) -> float | None:
    """The peak RSS the NanoQuant converter reported in the log next to its file ("..., peak RSS N MiB")."""
    log = model.with_suffix(".log")
    found = re.search(r"\) in \d+ s, peak RSS (\d+) MiB", log.read_text()) if log.is_file() else None
    return float(found.group(1)) if found else None


# --- chat metric -----------------------------------------------------------------------------------------------
def read_instructions(path: Path) -> list[str]:
    """One instruction a line (blank lines skipped). The converter's calibration list is refused, and so is an
    evaluation list sharing a line with it: a file tuned on an instruction would be scored on it."""
    from nanoquant.convert import calibration

    if path.resolve() == CHAT_CALIBRATION.resolve():
        raise ValueError(f"{path}: the calibration instructions are not an evaluation set")
    instructions = calibration.read_instructions(path)
    if CHAT_CALIBRATION.is_file():
        calibration_set = set(calibration.read_instructions(CHAT_CALIBRATION))
        shared = [i for i in instructions if i in calibration_set]
        if shared:
            raise ValueError(f"{path}: {len(shared)} instruction(s) also in {CHAT_CALIBRATION.name}, "
                             f"e.g. {shared[0]!r}")
    return instructions


def chat_prompt_ids(model, instruction: str) -> list[int]:
    """The token ids Model.chat decodes for one user turn: the GGUF's template, special tokens parsed, BOS added
    only where the model wants one and the template did not write it. The scores need the exact ids, not text."""
    prompt = model.apply_chat_template([{"role": "user", "content": instruction}])
    ids = model.tokenize(prompt, add_special=False, parse_special=True)
    lead = model.tokenize("", add_special=True, parse_special=True)  # [BOS] where the vocabulary adds one
    return ids if not lead or ids[:len(lead)] == lead else lead + ids


def greedy_ids(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The greedy continuation as token ids, the end-of-generation token included when it comes."""
    return model.generate_ids(prompt_ids, max_tokens, temperature=0.0)


def teacher_answers(teacher: Path, instructions: Path, out_dir: Path, max_tokens: int = CHAT_MAX_TOKENS,
                    threads: int = 2, teacher_sha256: str | None = None) -> dict:
    """The teacher's greedy answer ids to every instruction, made once: cached in out_dir under the teacher file's
    sha256, the instruction file's and the generation settings, so every row is scored on the same tokens."""
    key = {"teacher_sha256": teacher_sha256 or sha256(teacher), "instructions_sha256": sha256(instructions),
           "max_tokens": max_tokens, "n_ctx": CHAT_N_CTX, "decoding": "greedy", "template": "gguf chat_template"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    out = out_dir / f"chat-teacher-{digest}.json"
    if out.is_file():
        cached = json.loads(out.read_text())
        if cached["key"] == key:
            return cached
    from nanoquant import Model

    answers = []
    with Model(teacher, n_ctx=CHAT_N_CTX, n_threads=threads, seed=0) as m:
        for instruction in read_instructions(instructions):
            prompt = chat_prompt_ids(m, instruction)
            ids = greedy_ids(m, prompt, max_tokens)
            answers.append({"instruction": instruction, "prompt_ids": prompt, "answer_ids": ids,
                            "text": m.detokenize(ids)})
    result = {"key": key, "teacher": teacher.name, "instructions": str(instructions), "answers": answers}
    partial(out).write_text(json.dumps(result, indent=1) + "\n")
    finish(out)
    return result


def read_questions(path: Path) -> list[dict]:
    """{"question": ..., "accept": [pattern, ...]} a line; a question shared with the calibration list is refused."""
    questions = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for q in questions:
        if not q.get("question") or not q.get("accept"):
            raise ValueError(f"{path}: every line needs a question and accepted answers, got {q}")
    from nanoquant.convert import calibration

    calibration_set = set(calibration.read_instructions(CHAT_CALIBRATION)) if CHAT_CALIBRATION.is_file() else set()
    shared = [q["question"] for q in questions if q["question"] in calibration_set]
    if shared:
        raise ValueError(f"{path}: {len(shared)} question(s) also in {CHAT_CALIBRATION.name}, e.g. {shared[0]!r}")
    return questions


def answer_head(answer: str) -> str:
    """The part of an answer the verdict reads: up to the end of its first sentence of ANSWER_MIN_WORDS words or more
    (so "Sure! The capital is X." reads on to X, "A year has 365 days. 365 / 12 ..." stops at days), at most
    ANSWER_WINDOW characters."""
    head = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", answer.strip()):
        head.append(sentence)
        if len(sentence.split()) >= ANSWER_MIN_WORDS:
            break
    return " ".join(" ".join(head).split())[:ANSWER_WINDOW]


def answer_right(answer: str, accept: list[str]) -> bool:
    """An accepted answer (a regular expression) as a whole word ("Earth", not "super-Earth") in answer_head."""
    head = answer_head(answer)
    return any(re.search(rf"(?<![\w.-]){pattern}(?![\w-])", head, flags=re.IGNORECASE) for pattern in accept)


def answer_scores(candidate: Path, questions: list[dict], threads: int = 2) -> dict:
    """The file's own greedy answers to the questions under its chat template, and how many are right."""
    from nanoquant import Model

    answers = []
    with Model(candidate, n_ctx=CHAT_N_CTX, n_threads=threads, seed=0) as m:
        for q in questions:
            text = m.generate(chat_prompt_ids(m, q["question"]), max_tokens=ANSWER_TOKENS, temperature=0)
            answers.append({"question": q["question"], "answer": text.strip(), "right": answer_right(text, q["accept"])})
    return {"answers_right": sum(a["right"] for a in answers), "answers_total": len(answers), "answers": answers}




def bench_command(model: Path, row: Row) -> str:
    shown = model.relative_to(REPO) if model.is_relative_to(REPO) else model
    return f'.venv/bin/python bench/quality.py {shown} --rows "{row.method}"'


def talks(text: str) -> bool:
    """The cheap "does it talk" test: some text after strip() holding a word of two or more letters."""
    return re.search(r"[^\W\d_]{2,}", text.strip()) is not None


def chat_scores(candidate: Path, answers: dict, threads: int = 2, own_tokens: int = CHAT_OWN_TOKENS) -> dict:
    """A file scored on the teacher's answers, teacher-forced: one forward over prompt + answer each, so the
    candidate is judged on the teacher's text, not on where its own first mistake leads; plus its own greedy
    answers, as a count of the ones that hold a word and the first few for reading."""
    import numpy as np
    from nanoquant import Model

    agree = scored = 0
    nll = 0.0
    own = []
    with Model(candidate, n_ctx=CHAT_N_CTX, n_threads=threads, seed=0) as m:
        for a in answers["answers"]:
            prompt, target = a["prompt_ids"], np.asarray(a["answer_ids"], dtype=np.int64)
            if len(target):
                # row i predicts token i + 1: the answer's tokens come from the rows of the prompt's last token on
                rows = m.logits(prompt + a["answer_ids"][:-1])[len(prompt) - 1:].astype(np.float64)
                agree += int((rows.argmax(axis=1) == target).sum())
                top = rows.max(axis=1)
                log_z = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
                nll += float((log_z - rows[np.arange(len(target)), target]).sum())
                scored += len(target)
            own.append(m.generate(prompt, max_tokens=own_tokens, temperature=0))
    return {"chat_top1": agree / scored if scored else None, "chat_ppl": math.exp(nll / scored) if scored else None,
            "chat_answers": sum(map(talks, own)), "chat_instructions": len(own), "chat_tokens": scored,
            "chat_samples": [t.strip()[:CHAT_SAMPLE_CHARS] for t in own[:CHAT_SAMPLES]]}


class Bench:
    def __init__(self, model: Path, chunks: int | None, threads: int, preset: str,
                 chat_instructions: Path = CHAT_INSTRUCTIONS, chat_tokens: int = CHAT_MAX_TOKENS):
        self.model, self.threads, self.preset = model, threads, preset
        self.chat_instructions, self.chat_tokens = chat_instructions, chat_tokens
        self._chat_protocol = self._answers = self._teacher_sha256 = None  # made on first use: they need the F32
        self.name = model_name(model)
        self.profile = profile_for(model)
        self.chunks = chunks or self.profile.chunks
        self.row_names = {row.method: row for row in self.profile.rows}
        self.dir = RESULTS / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        # another chunk count is another protocol: its rows go to their own table
        suffix = "" if self.chunks == self.profile.chunks else f"-{self.chunks}chunks"
        self.json_path = RESULTS / f"quality-{self.name}{suffix}.json"
        self.rows = read_result(self.json_path)["rows"] if self.json_path.is_file() else []
        self.protocol = {"text": TEST_TEXT.name, "ctx": 512, "chunks": self.chunks}

    # --- files -----------------------------------------------------------------------------------------------
    def f32(self) -> Path:
        out = self.dir / "F32.gguf"
        if not out.is_file():
            if self.model.is_dir():
                run([sys.executable, REPO / "vendor/llama.cpp/convert_hf_to_gguf.py", self.model, "--outtype", "f32",
                     "--outfile", partial(out)], "convert_hf_to_gguf")
            else:  # the F32 dequantisation of a GGUF is its teacher
                run([BIN / "llama-quantize", "--allow-requantize", self.model, partial(out), "F32"],
                    "llama-quantize F32")
            finish(out)
        return out

    def imatrix(self) -> Path:
        out = self.dir / "imatrix.gguf"
        if not out.is_file():
            run([BIN / "llama-imatrix", "-m", self.f32(), "-f", CALIB_TEXT, "-c", 512, "--chunks", 100,
                 "-t", self.threads, "-o", partial(out)], "llama-imatrix")
            finish(out)
        return out

    def build(self, row: Row) -> tuple[Path, float | None, float | None]:
        """The row's file, made if missing; and the seconds and peak RSS (MiB) making it took when made now."""
        out = self.dir / f"{slug(row.method)}.gguf"
        if row.kind == "f32":
            return self.f32(), None, None
        if out.is_file():
            return out, None, None
        start, peak = time.time(), {}
        if row.kind == "llama":
            cmd = [BIN / "llama-quantize", "--allow-requantize"]
            if row.imatrix:
                cmd += ["--imatrix", self.imatrix()]
            start = time.time()  # the imatrix is made once for all rows: not this row's time
            run(cmd + [self.f32(), partial(out), row.llama_type, self.threads], f"llama-quantize {row.llama_type}",
                peak)
            finish(out)
        elif row.kind == "nq":
            args = conversion_args(row, self.preset)
            work = self.dir / f"work-{work_key(args)}"  # kept: rows that differ in tensor types only share it
            resume = ["--resume"] if (work / "manifest.json").is_file() else []
            log = run([sys.executable, REPO / "convert/convert-hf-to-nq-gguf.py", self.model, "--outfile", out,
                       "--threads", self.threads, *args, "--work-dir", work, "--keep-work", *resume],
                      f"NanoQuant converter ({row.method})")
            out.with_suffix(".log").write_text(log)  # stage timings, losses and peak RSS of the conversion
        elif row.kind == "sign":
            run([sys.executable, "-m", "bench.baselines", "sign", self.f32(), partial(out)],
                "per-row sign baseline", peak)
            finish(out)
        return out, time.time() - start, peak.get("mib")

    # --- scoring ---------------------------------------------------------------------------------------------
    def kld_base(self) -> Path:
        out = self.dir / f"F32-logits-{self.chunks}.kld"
        if not out.is_file():
            run(self.perplexity_cmd(self.f32()) + ["--kl-divergence-base", partial(out)],
                "llama-perplexity (F32 base)")
            finish(out)
        return out

    def perplexity_cmd(self, model: Path, chunks: int | None = None) -> list:
        return [BIN / "llama-perplexity", "-m", model, "-f", TEST_TEXT, "-c", 512, "--chunks", chunks or self.chunks,
                "-t", self.threads]

    def score(self, model: Path) -> dict:
        text = run(self.perplexity_cmd(model) + ["--kl-divergence-base", self.kld_base(), "--kl-divergence"],
                   f"llama-perplexity {model.name}")
        ppl = re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", text)
        kld = re.search(r"Mean\s+KLD:\s*(-?[0-9.]+)", text)
        top1 = re.search(r"Same top p:\s*([0-9.]+)", text)
        if not (ppl and kld and top1):
            raise RuntimeError(f"could not read PPL/KLD/top-1 from llama-perplexity:\n{text[-3000:]}")
        return {"ppl": float(ppl.group(1)), "kld": float(kld.group(1)), "top1": float(top1.group(1)) / 100}

    def reference_check(self, model: Path) -> float:
        """Relative PPL difference between llama-perplexity and the Python reference forward on REF_CHUNKS chunks."""
        from nanoquant.reference import gguf_add_bos, load_reference_model, open_gguf, perplexity

        what = f"llama-perplexity {model.name} ({REF_CHUNKS} chunks)"
        ppl_cpp = final_perplexity(run(self.perplexity_cmd(model, REF_CHUNKS) + REF_KV_F32, what), what)
        net, tokenizer, _ = load_reference_model(model)
        add_bos = gguf_add_bos(open_gguf(model))
        # llama.cpp's own token ids: transformers' tokenizer rebuilt from the GGUF splits WikiText differently
        # (e.g. " \n"), which alone moved SmolLM2's PPL by 8%
        ids = run([BIN / "llama-tokenize", "-m", model, "-f", TEST_TEXT, "--ids", "--no-bos", "--log-disable"],
                  "llama-tokenize")
        tokens = ([tokenizer.bos_token_id] if add_bos else []) + json.loads(ids[ids.index("["): ids.rindex("]") + 1])
        ppl_py = perplexity(net, tokens, 512, REF_CHUNKS, tokenizer.bos_token_id if add_bos else None)
        diff = abs(ppl_cpp - ppl_py) / ppl_py
        print(f"reference check over {REF_CHUNKS} chunks: llama-perplexity {ppl_cpp:.3f}, python {ppl_py:.3f}, "
              f"relative difference {diff:.2e}{'' if diff < REF_TOLERANCE else ' -- OVER THE 1% TOLERANCE'}")
        return diff

    def chat_protocol(self) -> dict:
        """What a row's chat numbers depend on: a row whose protocol differs (or that has none) is scored again."""
        if self._chat_protocol is None:
            teacher = self.f32()
            self._teacher_sha256 = sha256(teacher)
            self._chat_protocol = {"instructions": self.chat_instructions.name,
                                   "instructions_sha256": sha256(self.chat_instructions)[:16],
                                   "max_tokens": self.chat_tokens, "own_tokens": CHAT_OWN_TOKENS,
                                   "teacher": teacher.name, "teacher_sha256": self._teacher_sha256[:16]}
        return self._chat_protocol

    def chat(self, model: Path) -> dict:
        """The row's chat fields: its scores on the teacher's answers (made on first use) and their protocol."""
        protocol = self.chat_protocol()
        if self._answers is None:
            self._answers = teacher_answers(self.f32(), self.chat_instructions, self.dir, self.chat_tokens,
                                            self.threads, self._teacher_sha256)
        scores = chat_scores(model, self._answers, self.threads)
        print(f"chat over {scores['chat_instructions']} instructions: top-1 {scores['chat_top1']:.3f}, "
              f"ppl {scores['chat_ppl']:.2f}, {scores['chat_answers']} answers with a word", flush=True)
        return {**scores, "chat_protocol": protocol}

    def cached(self, method: str, digest: str) -> dict | None:
        for r in self.rows:
            if r["method"] == method and r["sha256"] == digest and r["protocol"] == self.protocol:
                return r
        return None

    def answers_protocol(self) -> dict:
        return {"questions": ANSWER_QUESTIONS.name, "questions_sha256": sha256(ANSWER_QUESTIONS)[:16],
                "max_tokens": ANSWER_TOKENS, "window_chars": ANSWER_WINDOW, "min_words": ANSWER_MIN_WORDS,
                "rule": "first sentence", "decoding": "greedy",
                "template": "gguf chat_template"}

    def answers(self, model: Path) -> dict:
        scores = answer_scores(model, read_questions(ANSWER_QUESTIONS), self.threads)
        print(f"answers: {scores['answers_right']}/{scores['answers_total']} right", flush=True)
        return {**scores, "answers_protocol": self.answers_protocol()}

    def evaluate(self, row: Row) -> dict:
        path, seconds, peak_mib = self.build(row)
        key = work_key(conversion_args(row, self.preset)) if row.kind == "nq" else None
        if row.kind == "nq" and conversion_cost(path) is not None:
            seconds, peak_mib = conversion_cost(path)
        elif row.kind == "nq" and written_from_checkpoint(path):  # another row's conversion, written again: its cost
            made = next((r for r in self.rows if r.get("work_key") == key and r.get("convert_s") is not None
                         and not r.get("written_from_checkpoint")), {})
            seconds, peak_mib = made.get("convert_s"), made.get("peak_rss_mib")
        elif row.kind == "nq":  # the converter's own clock, from its log: also right when a file is re-made to time it
            seconds = converter_seconds(path) or seconds
            peak_mib = converter_peak_mib(path) or peak_mib
        digest = sha256(path)
        hit = self.cached(row.method, digest)
        if hit is not None and seconds is not None and hit.get("convert_s") != seconds:
            hit["convert_s"] = seconds
            self.save()
        if hit is not None and peak_mib is not None and hit.get("peak_rss_mib") != peak_mib:
            hit["peak_rss_mib"] = peak_mib
            self.save()
        if hit is not None and row.kind == "nq" and hit.get("ref_protocol") != REF_PROTOCOL:
            hit.update(ref_rel_diff=self.reference_check(path), ref_protocol=REF_PROTOCOL)  # an older check: redo it
            self.save()
        if hit is not None and hit.get("chat_protocol") != self.chat_protocol():  # older rows: chat only, no PPL
            hit.update(self.chat(path))
            self.save()
        if hit is not None and hit.get("answers_protocol") != self.answers_protocol():
            hit.update(self.answers(path))
            self.save()
        if hit is not None:
            hit.setdefault("file_bytes", hit.get("size_bytes"))
            print(f"{row.method}: cached")
            return hit
        previous = next((r for r in self.rows if r["method"] == row.method), None)
        if seconds is None and previous is not None and row.kind != "f32":
            seconds = previous.get("convert_s")  # the file was made by an earlier run
        if peak_mib is None and previous is not None and row.kind != "f32":
            peak_mib = previous.get("peak_rss_mib")
        bits, weights = decoder_linear_bits(path)
        bpw_linear = bits / weights
        if row.kind == "sign":  # stored densely for evaluation: count what a 1-bit packing with row scales takes
            bpw_linear = row_sign_bpw(path)
        size, info = path.stat().st_size, describe(path)
        result = {"method": row.method, "bpw_linear": bpw_linear, "bpw_file": 8 * size / info.dense_parameters,
                  "size_bytes": size, "file_bytes": size, **self.score(path), "convert_s": seconds,
                  "peak_rss_mib": peak_mib,
                  "ref_rel_diff": self.reference_check(path) if row.kind == "nq" else None,
                  "ref_protocol": REF_PROTOCOL if row.kind == "nq" else None, **self.chat(path),
                  **self.answers(path), "sha256": digest, "protocol": self.protocol, "note": row.note,
                  "machine": machine(), "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
                  "command": bench_command(self.model, row), "work_key": key,
                  "written_from_checkpoint": row.kind == "nq" and written_from_checkpoint(path),
                  "conversion_settings": info.conversion_settings}  # NQ files record how they were made
        self.rows = [r for r in self.rows if r["method"] != row.method] + [result]
        self.save()
        return result

    # --- output ----------------------------------------------------------------------------------------------
    def save(self) -> None:
        order = {row.method: i for i, row in enumerate(self.profile.rows)}
        self.rows.sort(key=lambda r: order.get(r["method"], len(order)))
        write_result(self.json_path, {"rows": self.rows}, meta(), markdown(self.rows, self))
        plot(self.rows, self.json_path.with_suffix(".png"), self.name, self.chunks)


def row_sign_bpw(path: Path) -> float:
    shapes = decoder_linear_shapes(path)
    return sum(o * i + 16 * o for o, i in shapes) / sum(o * i for o, i in shapes)



def flat_record(record: dict, prefix: str = "") -> dict:
    """A nested settings record as {"admm.iterations": 120, ...}."""
    out = {}
    for key, value in record.items():
        out.update(flat_record(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


# what a settings record made before a setting existed meant by leaving it out: the behaviour of that time
UNRECORDED_MEANT = {"calib_chat": "none", "rank_allocation": "uniform", "rank_spread": 0, "shared_v": "none",
                    "tune.loss": "absolute"}
# settings that only act together with another's value (setting: (other, value)); where either side lacks it,
# the other setting's line says the difference
ACTS_ONLY_WITH = {"rank_spread": ("rank_allocation", "sensitivity")}


def settings_drift(row: Row, preset: str, made: dict | None) -> list[str]:
    """Where a row's file was made with settings its command no longer gives, as "calib_windows 32 (now 64)": rows
    are cached by file, so rows made before a preset changed stay in the table, and this says how they differ. Step
    counts the converter scales with the ranks are left out (they follow the model's shapes, not the command);
    settings that no longer exist are not listed."""
    if row.kind != "nq" or made is None:
        return []
    args = build_parser().parse_args(["model", "--outfile", "out.gguf", "--bpw", str(row.bpw), "--preset", preset,
                                      *row.converter_args])
    now = settings_from_args(args)
    today, then = flat_record(json.loads(settings_record(now))), UNRECORDED_MEANT | flat_record(made)
    skip = {*now.rank_scaled, "rank_scaled"} | {key for key, (other, value) in ACTS_ONLY_WITH.items()
                                                 if today[other] != value or then.get(other) != value}
    return [f"{key} {then.get(key, 'not recorded')} (now {value})" for key, value in today.items()
            if key not in skip and (key not in then or then[key] != value)]


def markdown(rows: list[dict], bench: Bench) -> str:
    teacher = next((r["ppl"] for r in rows if r["method"] == "F32"), None)
    lines = [f"Model `{bench.model.name}`; WikiText-2 test raw, ctx 512, first {bench.chunks} chunks, patched "
             f"llama-perplexity; kld/top1 against F32. Machine: {rows[0]['machine'] if rows else '-'}.", "",
             "| method | bpw_linear | bpw_file | file MB | ppl | x F32 | kld | top1 | chat_top1 | chat_ppl | "
             "chat_answers | answers right | convert_s | peak RSS MiB | ref_rel_diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['ppl'] / teacher:.2f}" if teacher else "-"
        convert = "-" if r["convert_s"] is None else f"{r['convert_s']:.0f}"
        peak = "-" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:,.0f}"
        ref = "-" if r.get("ref_rel_diff") is None else f"{r['ref_rel_diff']:.1e}"
        chat = (f"{r['chat_top1']:.3f} | {r['chat_ppl']:.2f} | {r['chat_answers']}/{r['chat_instructions']}"
                if r.get("chat_top1") is not None else "- | - | -")
        answers = f"{r['answers_right']}/{r['answers_total']}" if r.get("answers_total") else "-"
        size = r.get("file_bytes", r["size_bytes"])
        lines.append(f"| {r['method']} | {r['bpw_linear']:.3f} | {r['bpw_file']:.3f} | {size / 1e6:,.1f} | "
                     f"{r['ppl']:.2f} | {ratio} | {r['kld']:.4f} | {r['top1']:.3f} | {chat} | {answers} | {convert} | "
                     f"{peak} | {ref} |")
    notes = [f"- {r['method']}: {r['note']}" for r in rows if r.get("note")]
    drift = {r["method"]: settings_drift(bench.row_names[r["method"]], bench.preset, r.get("conversion_settings"))
             for r in rows if r["method"] in bench.row_names}
    notes += [f"- {method}: made before the settings its command gives now: {'; '.join(changes)}"
              for method, changes in drift.items() if changes]
    chat_rows = [r for r in rows if r.get("chat_protocol")]
    if chat_rows:
        c = chat_rows[0]["chat_protocol"]
        lines += ["", f"chat_*: teacher-forced on the {c['teacher']} teacher's greedy answers (at most "
                  f"{c['max_tokens']} tokens) to {chat_rows[0]['chat_instructions']} instructions of "
                  f"`{c['instructions']}` (sha256 {c['instructions_sha256'][:12]}); chat_top1 is the share of answer "
                  f"tokens where the file's argmax is the teacher's token, chat_ppl exp of their mean NLL; "
                  f"chat_answers counts its own greedy answers ({c['own_tokens']} tokens) that hold a word."]
    answered = [r for r in rows if r.get("answers_protocol")]
    if answered:
        a = answered[0]["answers_protocol"]
        lines += ["", f"answers right: greedy answers ({a['max_tokens']} tokens at most, the GGUF's chat template) to "
                  f"the {answered[0]['answers_total']} questions of `{a['questions']}` (sha256 "
                  f"{a['questions_sha256'][:12]}) whose first sentence of {a['min_words']} words or more (at most "
                  f"{a['window_chars']} characters, shorter sentences before it included) holds an accepted answer."]
    samples = [f"- {r['method']}: {json.dumps(r['chat_samples'][0], ensure_ascii=False)}"
               for r in chat_rows if r.get("chat_samples")]
    if samples:
        lines += ["", "Each file's own greedy answer to the first instruction:", ""] + samples
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot(rows: list[dict], out: Path, name: str, chunks: int) -> None:
    """Two Pareto views: PPL against the whole file's size, and against the decoder linears' bits per weight."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    views = ((lambda r: r.get("file_bytes", r["size_bytes"]) / 1e6, "whole file (MB)"),
             (lambda r: r["bpw_linear"], "bits per weight of the decoder linear layers (from the file)"))
    for ax, (x_of, label) in zip(axes, views):
        for family, marker, pick in (("llama.cpp", "o", lambda m: not m.startswith(("NQ", "ablation"))),
                                     ("NanoQuant", "s", lambda m: m.startswith("NQ")),
                                     ("ablations", "x", lambda m: m.startswith("ablation"))):
            sel = [r for r in rows if pick(r["method"])]
            if not sel:
                continue
            ax.scatter([x_of(r) for r in sel], [r["ppl"] for r in sel], marker=marker, label=family)
            for r in sel:
                ax.annotate(re.sub(r"^ablation [0-9.]+: ", "", r["method"]), (x_of(r), r["ppl"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"WikiText-2 PPL (ctx 512, {chunks} chunks)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL, help="HF folder or GGUF (the teacher)")
    p.add_argument("--chunks", type=int, default=None, help="perplexity chunks (default: the model's profile)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", default="standard", help="converter preset of the NanoQuant rows")
    p.add_argument("--rows", nargs="*", default=None, help=f"rows to run (default all): {list(ROW_NAMES)}")
    p.add_argument("--chat-instructions", type=Path, default=CHAT_INSTRUCTIONS,
                   help="evaluation instructions of the chat metric, one a line")
    p.add_argument("--chat-tokens", type=int, default=CHAT_MAX_TOKENS, help="most tokens of a teacher answer")
    args = p.parse_args(argv)
    if not args.model.exists():
        p.error(f"{args.model}: no such file or folder")
    rows = profile_for(args.model).rows
    known = [row.method for row in rows]
    unknown = [r for r in args.rows or [] if r not in known]
    if unknown:
        p.error(f"--rows: unknown for {model_name(args.model)}: {unknown}; known: {known}")
    if args.chat_tokens < 1:
        p.error("--chat-tokens: at least 1")
    if not args.chat_instructions.is_file():
        p.error(f"--chat-instructions: {args.chat_instructions}: no such file")
    bench = Bench(args.model, args.chunks, args.threads, args.preset, args.chat_instructions, args.chat_tokens)
    for row in (bench.row_names[r] for r in args.rows) if args.rows else rows:
        r = bench.evaluate(row)
        print(f"{r['method']:<44} bpw_linear {r['bpw_linear']:.3f}  file {r['file_bytes'] / 1e6:.0f} MB  "
              f"ppl {r['ppl']:.2f}  kld {r['kld']:.4f}  top1 {r['top1']:.3f}  chat_top1 {r['chat_top1']:.3f}  "
              f"answers {r['answers_right']}/{r['answers_total']}", flush=True)
    bench.save()
    print(f"wrote {bench.json_path} and .md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
