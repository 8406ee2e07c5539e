"""--device: where the converter's torch stages compute. On the CPU the option changes nothing, byte for byte; a device
torch cannot see is refused before any work; the device is neither part of a file's settings record nor of a work
folder's identity (a conversion checkpointed on a GPU resumes on a CPU)."""
import time
from dataclasses import replace

import pytest
import torch

from conftest import TINY_METHOD_ARGS, make_tiny_model, run_converter

ARGS = ("--bpw", "1.0", *TINY_METHOD_ARGS, "--seed", "5")
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # so that "no option" (auto) means the CPU on a GPU machine too


def test_device_cpu_writes_the_bytes_of_a_run_without_the_option(tmp_path, smol_tokenizer):
    hf = make_tiny_model("llama", tmp_path / "hf", smol_tokenizer)
    plain, on_cpu = tmp_path / "plain.gguf", tmp_path / "cpu.gguf"
    proc = run_converter(hf, "--outfile", plain, *ARGS, env=NO_GPU)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loading: on cpu" in proc.stdout
    proc = run_converter(hf, "--outfile", on_cpu, *ARGS, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert on_cpu.read_bytes() == plain.read_bytes()


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here")
def test_device_cuda_without_a_gpu_is_refused_before_any_work(tmp_path, smol_tokenizer):
    hf = make_tiny_model("llama", tmp_path / "hf", smol_tokenizer)
    out = tmp_path / "x.gguf"
    start = time.time()
    proc = run_converter(hf, "--outfile", out, *ARGS, "--device", "cuda")
    assert proc.returncode == 2 and "--device cuda" in proc.stderr and "no CUDA device" in proc.stderr, proc.stderr
    assert time.time() - start < 30  # the interpreter and torch's import, no calibration
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_the_device_is_not_part_of_the_record_nor_of_the_work_folder(tmp_path):
    from nanoquant.convert.checkpoint import work_identity
    from nanoquant.convert.output import settings_record
    from nanoquant.convert.settings import ConvertSettings

    source = tmp_path / "model.gguf"
    source.write_bytes(b"x")
    auto = ConvertSettings()
    for device in ("cpu", "cuda"):
        assert work_identity(source, replace(auto, device=device)) == work_identity(source, auto)
        assert settings_record(replace(auto, device=device)) == settings_record(auto)


def test_auto_is_the_gpu_when_torch_sees_one():
    from nanoquant.convert.settings import torch_device

    assert torch_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert torch_device("cpu") == torch.device("cpu")
