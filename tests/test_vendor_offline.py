"""scripts/vendor_llama_cpp.py --offline, which bench/gpu_check.sh runs on a device machine without network: a copied
tree made from this checkout's patches is taken (its stamp touched, so make does not remake it); any other is refused
with its stamp named, and nothing is downloaded."""
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO

STAMP_NAME = ".nanoquant-patches.sha256"
SCRIPT = REPO / "scripts" / "vendor_llama_cpp.py"


def these_patches_fingerprint() -> str:
    spec = importlib.util.spec_from_file_location("vendor_llama_cpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.patches_fingerprint(sorted((REPO / "ggml_patches").glob("[0-9][0-9][0-9][0-9]-*.patch")))


def vendor_offline(dest, downloads):
    return subprocess.run([sys.executable, str(SCRIPT), "--offline", "--patches", str(REPO / "ggml_patches"),
                           "--dest", str(dest), "--downloads", str(downloads)], capture_output=True, text=True,
                          timeout=60)


def test_a_tree_made_from_these_patches_is_taken_and_its_stamp_touched(tmp_path):
    tree = tmp_path / "llama.cpp"
    tree.mkdir()
    stamp = tree / STAMP_NAME
    stamp.write_text(these_patches_fingerprint() + "\n")
    os.utime(stamp, (1_000_000_000, 1_000_000_000))  # older than every patch
    proc = vendor_offline(tree, tmp_path / "downloads")
    assert proc.returncode == 0, proc.stderr
    assert stamp.stat().st_mtime > max(p.stat().st_mtime for p in (REPO / "ggml_patches").glob("*.patch"))
    assert not (tmp_path / "downloads").exists()


@pytest.mark.parametrize("stamp_text", [None, "0" * 64 + "\n"], ids=["no stamp", "other patches"])
def test_any_other_tree_is_refused_without_a_download(tmp_path, stamp_text):
    tree = tmp_path / "llama.cpp"
    tree.mkdir()
    if stamp_text is not None:
        (tree / STAMP_NAME).write_text(stamp_text)
    proc = vendor_offline(tree, tmp_path / "downloads")
    assert proc.returncode == 1
    assert "was not made from" in proc.stderr and ("no stamp" if stamp_text is None else "0" * 64) in proc.stderr
    assert not (tmp_path / "downloads").exists() and sorted(p.name for p in tree.iterdir()) == \
        ([] if stamp_text is None else [STAMP_NAME])
