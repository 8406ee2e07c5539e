"""`pip install .` in a fresh virtual environment: scikit-build-core builds nanoquant._core against the patched
libraries of this checkout's build (NANOQUANT_LIBS_FROM, so llama.cpp is not compiled twice), the wheel carries them,
and the package works from any folder through its entry points: its converter turns a Hugging Face folder into a
NanoQuant file with chat calibration using only what the wheel carries (llama.cpp's converter, libllama's quantizer
for the answering teacher), and the file runs."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, TINY_METHOD_ARGS, make_tiny_model

CHECK = """
import sys, nanoquant
from nanoquant import _core
assert nanoquant.__file__.startswith(sys.prefix), nanoquant.__file__   # the installed copy, not the checkout
assert _core.__file__.startswith(sys.prefix), _core.__file__
with nanoquant.Model(sys.argv[1], n_ctx=128, n_threads=2) as model:
    print(len(model.generate_ids("hello", max_tokens=4, temperature=0.0, ignore_eos=True)))
"""


def _run(*cmd, cwd, timeout=900):
    # nothing of the checkout: not its modules, not its llama.cpp tree
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "NANOQUANT_LLAMA_CPP")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_pip_install_gives_a_working_package_and_entry_points(tmp_path, tiny_nq_models, smol_tokenizer):
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q"]
    _run(*pip, REPO / "vendor" / "llama.cpp" / "gguf-py", cwd=tmp_path)  # the gguf-py that knows NQ1
    _run(*pip, REPO, "-C", f"cmake.define.NANOQUANT_LIBS_FROM={REPO / 'build'}", cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert _run(venv / "bin" / "python", "-c", CHECK, tiny_nq_models["llama"], cwd=elsewhere).split()[-1] == "4"
    assert "NanoQuant" in _run(venv / "bin" / "nanoquant", "info", tiny_nq_models["llama"], cwd=elsewhere)
    assert "--bpw" in _run(venv / "bin" / "convert-hf-to-nq-gguf", "--help", cwd=elsewhere)

    hf = make_tiny_model("llama", tmp_path / "hf", smol_tokenizer)
    out = elsewhere / "tiny-nq.gguf"
    log = _run(venv / "bin" / "convert-hf-to-nq-gguf", hf, "--outfile", out, "--bpw", "1.0", *TINY_METHOD_ARGS,
               "--calib-chat", "auto", cwd=elsewhere, timeout=1800)
    assert "calibration: the teacher answered" in log, log[-3000:]  # chat calibration ran, on the wheel's own pieces
    assert _run(venv / "bin" / "python", "-c", CHECK, out, cwd=elsewhere).split()[-1] == "4"
