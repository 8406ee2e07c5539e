#!/usr/bin/env python3
"""Fetch the pinned llama.cpp (inside the llama-cpp-python sdist), verify it, and apply ggml_patches/ in order.

Idempotent: the patched tree is rebuilt only when the sdist or a patch changes (a stamp file records both).
Extraction keeps the archive's timestamps, so only files touched by a patch look new to the build.
"""
import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e57098bba"
TREE_IN_SDIST = "llama_cpp_python-0.3.36/vendor/llama.cpp/"


def fail(message: str) -> None:
    print(f"vendor_llama_cpp: error: {message}", file=sys.stderr)
    sys.exit(1)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_sdist(downloads: Path) -> Path:
    sdist = downloads / SDIST_NAME
    if not sdist.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        print(f"vendor_llama_cpp: downloading {SDIST_REQUIREMENT} sdist", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", "-d", str(downloads), SDIST_REQUIREMENT]
        if subprocess.run(cmd).returncode != 0 or not sdist.exists():
            fail(f"could not download {SDIST_REQUIREMENT} with pip into {downloads}")
    actual = sha256_of(sdist)
    if actual != SDIST_SHA256:
        fail(f"{sdist} has sha256 {actual}, expected {SDIST_SHA256}; delete it and retry")
    return sdist


def extract_tree(sdist: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(TREE_IN_SDIST) or "/.git" in m.name[len(TREE_IN_SDIST) - 1:]:
                continue
            m.name = m.name[len(TREE_IN_SDIST):]
            if m.name:
                members.append(m)
        tar.extractall(tmp, members=members, filter="tar")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def apply_patches(tree: Path, patches: list[Path]) -> None:
    for patch in patches:
        base = ["patch", "-p1", "--forward", "--batch", "-d", str(tree), "-i", str(patch.resolve())]
        check = subprocess.run(base + ["--dry-run"], capture_output=True, text=True)
        if check.returncode != 0:
            fail(f"patch {patch.name} does not apply to llama.cpp {LLAMA_CPP_COMMIT}:\n{check.stdout}{check.stderr}")
        subprocess.run(base + ["--quiet"], check=True)
        print(f"vendor_llama_cpp: applied {patch.name}")


def patches_fingerprint(patches: list[Path]) -> str:
    """What a tree's stamp holds: the sdist's hash and every patch's name and bytes, in order."""
    fingerprint = hashlib.sha256(SDIST_SHA256.encode())
    for p in patches:
        fingerprint.update(p.name.encode() + b"\0" + p.read_bytes())
    return fingerprint.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--downloads", type=Path, default=Path("downloads"))
    parser.add_argument("--patches", type=Path, default=Path("ggml_patches"))
    parser.add_argument("--dest", type=Path, default=Path("vendor/llama.cpp"))
    parser.add_argument("--offline", action="store_true",
                        help="accept only a copied tree made from these patches (its stamp says so); never download "
                             "nor re-patch (bench/gpu_check.sh on a machine without network)")
    parser.add_argument("--unpatched", action="store_true",
                        help="the sdist's llama.cpp as it is, no patch applied (tests/test_rpc.py's worker built "
                             "without NanoQuant)")
    args = parser.parse_args()

    patches = [] if args.unpatched else sorted(args.patches.glob("[0-9][0-9][0-9][0-9]-*.patch"))
    fingerprint = patches_fingerprint(patches)
    stamp = args.dest / ".nanoquant-patches.sha256"
    if stamp.exists() and stamp.read_text().strip() == fingerprint:
        stamp.touch()  # up to date: newer than the patches for make, and no sdist needed (a copied tree)
        return
    if args.offline:
        found = stamp.read_text().strip() if stamp.exists() else "no stamp"
        fail(f"{args.dest} was not made from {args.patches}/ (its {stamp.name}: {found}; these patches: "
             f"{fingerprint}); --offline makes no other tree: copy one made by `make` from these patches")
    sdist = fetch_sdist(args.downloads)
    print(f"vendor_llama_cpp: extracting llama.cpp {LLAMA_CPP_COMMIT} into {args.dest}", flush=True)
    extract_tree(sdist, args.dest)
    apply_patches(args.dest, patches)
    stamp.write_text(fingerprint + "\n")


if __name__ == "__main__":
    main()
