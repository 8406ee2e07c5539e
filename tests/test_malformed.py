"""The malformed-file corpus (bench.corpus) made from a valid tiny NQ file and from the same model as an ordinary
file (its layers densified to F32): in llama-completion, llama-cli, llama-server, llama-bench and nanoquant.Model, no
variant crashes or hangs, no structural defect is accepted, and every refusal carries its reason."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN
from bench import corpus
from nanoquant.reference import densify_gguf


@pytest.fixture(scope="module")
def corpora(tiny_nq_models, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    folder = tmp_path_factory.mktemp("corpus")
    nq = tiny_nq_models["llama"]  # carries s_mid too, so its defects are reachable
    plain = densify_gguf(nq, folder / "plain.gguf")
    return {"nq": (nq, corpus.variants(nq, folder / "nq")), "plain": (plain, corpus.variants(plain, folder / "plain"))}


def test_the_corpus_covers_every_kind_of_defect(corpora):
    nq, plain = corpora["nq"][1], corpora["plain"][1]
    assert len(nq) == len(corpus.DEFECTS)  # every defect applies to an NQ file with s_mid
    assert {"magic", "truncated-in-data", "tensor-name-duplicate", "norm-f16", "norm-nan", "extra-tensor",
            "bit-flips-in-linear"} <= set(plain)
    assert not any(name.startswith(("factor-", "scale-", "rank-")) for name in plain)


@pytest.mark.parametrize("tool", corpus.TOOLS)
@pytest.mark.parametrize("source", ["nq", "plain"])
def test_no_crash_hang_silent_acceptance_or_reasonless_refusal(source, tool, corpora):
    src, made = corpora[source]
    intact = {"intact": (corpus.Defect("intact", corpus.DATA, lambda a: "", lambda *a: src), src)}
    assert corpus.run_corpus(BIN, intact, src, tools=(tool,))["intact"][tool].result == corpus.ACCEPTED
    results = corpus.run_corpus(BIN, made, src, tools=(tool,))
    assert not corpus.failures(made, results), "\n".join(corpus.failures(made, results))
    refused = sum(by[tool].result == corpus.REFUSED for by in results.values())
    structural = sum(defect.kind == corpus.STRUCTURAL for defect, _ in made.values())
    assert refused >= structural


def test_nanoquant_info_refuses_a_nan_scale(corpora):
    path = corpora["nq"][1]["scale-nan"][1]
    proc = subprocess.run([sys.executable, "-m", "nanoquant", "info", str(path)],
                          capture_output=True, text=True, timeout=300)
    anchors = corpus.Anchors.of(corpora["nq"][0])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert anchors.nq("nq_s_post") in proc.stderr and "non-finite" in proc.stderr, proc.stderr[-2000:]
