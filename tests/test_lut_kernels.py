"""The table-lookup kernels of cpp/nq1-lut.c, compiled on their own: natively (AVX-512 or AVX2, whatever this CPU has),
natively without AVX-512 (so AVX2 is tested on AVX-512 machines too), without SIMD, and for aarch64 (NEON) run under
qemu-user. Each build checks its kernel against the scalar reference bit for bit."""
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "cpp" / "nq1-lut.c", REPO / "tests" / "kernels" / "nq1_lut_test.c"]
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")

BUILDS = {
    "native": (["gcc", "-O2", "-march=native"], []),
    "native-no-avx512": (["gcc", "-O2", "-march=native", "-mno-avx512f"], []),
    "scalar": (["gcc", "-O2", "-mno-avx2"], []),
    "neon": (["aarch64-linux-gnu-gcc", "-O2", "-march=armv8-a"], ["qemu-aarch64", "-L", str(AARCH64_SYSROOT)]),
}
EXPECTED_KERNEL = {"scalar": "scalar", "neon": "neon"}
# the x86 features each SIMD kernel of cpp/nq1-lut.c is compiled for (its #if lines); a native build on a CPU that has
# them must run that kernel, so a broken feature test fails here instead of quietly falling back to a slower path
KERNEL_FEATURES = {"avx512": {"avx512f", "avx512bw", "avx512vbmi", "avx512_vnni", "avx2", "fma"},
                   "avx2": {"avx2", "fma"}}


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def _best_native_kernel(allowed: tuple[str, ...]) -> str:
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "neon"
    flags = _cpu_flags()
    return next((name for name in allowed if KERNEL_FEATURES[name] <= flags), "scalar")


@pytest.mark.parametrize("build", BUILDS)
def test_lut_kernel_equals_scalar_reference(build, tmp_path):
    compiler, runner = BUILDS[build]
    missing = [tool for tool in compiler[:1] + runner[:1] if shutil.which(tool) is None]
    if missing:
        # `make test` installs them (gcc-aarch64-linux-gnu, qemu-user) where apt can; say why they are absent
        pytest.skip(f"{', '.join(missing)} not installed (Debian packages gcc-aarch64-linux-gnu, qemu-user)")
    exe = tmp_path / f"nq1_lut_test_{build}"
    cc = subprocess.run(compiler + ["-Wall", "-Wextra", "-Werror", f"-I{REPO / 'cpp'}", *map(str, SOURCES), "-lm",
                                    "-o", str(exe)], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    run = subprocess.run(runner + [str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert run.stdout.strip().endswith("all ok")
    kernels = {line.split()[0] for line in run.stdout.splitlines()[:-1]}
    assert len(kernels) == 1, kernels
    if build in EXPECTED_KERNEL:
        assert kernels == {EXPECTED_KERNEL[build]}
    elif build == "native":  # the best kernel this CPU has
        assert kernels == {_best_native_kernel(("avx512", "avx2"))}, _cpu_flags() & set().union(*KERNEL_FEATURES.values())
    else:  # native-no-avx512
        assert kernels == {_best_native_kernel(("avx2",))}
