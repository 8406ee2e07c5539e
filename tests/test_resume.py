"""A conversion killed mid-way continues with --resume and writes the same bytes as an uninterrupted one."""
import re
import subprocess
import sys
import time

from conftest import CONVERTER, TINY_METHOD_ARGS, make_tiny_model, run_converter

N_LAYERS = 4
# enough STE steps that a block takes a visible moment, so the kill lands between blocks 1 and 3
ARGS = ("--bpw", "1.0", *TINY_METHOD_ARGS, "--factor-steps", "25", "--seed", "3")


def test_killed_conversion_resumes_to_identical_bytes(tmp_path, smol_tokenizer):
    hf = make_tiny_model("llama", tmp_path / "hf", smol_tokenizer, n_layers=N_LAYERS)
    reference = tmp_path / "uninterrupted.gguf"
    proc = run_converter(hf, "--outfile", reference, *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from bench.memory import STAGE_PEAK, STAGES  # bench/memory.py reads every stage's peak from these lines
    assert {m.group(1) for m in STAGE_PEAK.finditer(proc.stdout)} == STAGES, proc.stdout[-3000:]

    out = tmp_path / "resumed.gguf"
    work = tmp_path / "resumed.gguf.work"
    killed = subprocess.Popen([sys.executable, str(CONVERTER), str(hf), "--outfile", str(out), *ARGS],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (work / "block-0001.pt").exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed.kill()
    assert killed.wait() != 0, "the conversion finished before it could be killed"
    done = sorted(work.glob("block-*.pt"))
    assert 2 <= len(done) < N_LAYERS and not out.exists()
    assert not list(tmp_path.glob("resumed.gguf.partial"))

    refused = run_converter(hf, "--outfile", out, *ARGS)  # the work folder is not silently overwritten
    assert refused.returncode == 2 and "--resume" in refused.stderr
    other = run_converter(hf, "--outfile", out, *ARGS, "--resume", "--factor-steps", "26")
    assert other.returncode == 2 and "different conversion" in other.stderr and "settings" in other.stderr

    resumed = run_converter(hf, "--outfile", out, *ARGS, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # a kill between a block's file and the stream file redoes that block
    last = int(re.search(r"resuming after block (\d+)", resumed.stdout).group(1))
    assert len(done) - 2 <= last <= len(done) - 1
    assert out.read_bytes() == reference.read_bytes()
    assert not work.exists()


def test_resume_without_a_work_folder_is_an_error(tmp_path, smol_tokenizer):
    hf = make_tiny_model("llama", tmp_path / "hf", smol_tokenizer)
    proc = run_converter(hf, "--outfile", tmp_path / "x.gguf", "--resume")
    assert proc.returncode == 2 and "x.gguf.work" in proc.stderr and "nothing to resume" in proc.stderr


def test_a_work_folder_belongs_to_everything_but_the_distillation(tmp_path):
    from dataclasses import replace

    from nanoquant.convert.admm import AdmmSettings
    from nanoquant.convert.checkpoint import work_identity
    from nanoquant.convert.reconstruct import DistillSettings
    from nanoquant.convert.settings import ConvertSettings

    source = tmp_path / "model.gguf"
    source.write_bytes(b"x")
    base = ConvertSettings(rank_scaled=("admm.iterations",))
    other_distillation = replace(base, distill=DistillSettings(steps=7, lr=3e-3))
    assert work_identity(source, base) == work_identity(source, other_distillation)
    assert work_identity(source, base) != work_identity(source, replace(base, admm=AdmmSettings(iterations=3)))
    assert work_identity(source, base) != work_identity(source, replace(base, mid_scale=True))
