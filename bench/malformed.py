"""Malformed-file corpus: every defect of bench.corpus made from an NQ file and from an ordinary llama.cpp file,
each fed to llama-completion, llama-cli, llama-server, llama-bench and nanoquant.Model.

    .venv/bin/python bench/malformed.py [--nq FILE] [--plain FILE]

Defaults: the fast-preset SmolLM2 NQ file of bench/quality.py (made by it) and the embedded Q4_1 teacher. Variants are
written one at a time under a temporary folder and removed after their runs. Writes bench/results/malformed.json and
.md: per file and tool, how many variants were refused with their reason, accepted, crashed, hung or refused without
a reason, and every failure by name. Exit 1 if the corpus finds a failure (see bench.corpus.failures).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench import corpus
from bench.common import BIN, DEFAULT_MODEL, RESULTS, meta, write_result

DEFAULT_NQ = RESULTS / "SmolLM2-135M-Instruct" / "NQ-1.0-fast-preset.gguf"
DEFAULT_PLAIN = DEFAULT_MODEL
OUTCOMES = (corpus.REFUSED, corpus.ACCEPTED, corpus.CRASH, corpus.HANG, corpus.NO_REASON)


def run_file(src: Path) -> dict:
    """defect -> {"kind", "tool" -> [result, detail]} for every variant of src."""
    rows = {}
    with tempfile.TemporaryDirectory(prefix="nq-corpus-") as tmp:
        anchors = corpus.Anchors.of(src)
        for defect in corpus.DEFECTS:
            if not defect.applies(anchors):
                continue
            path = defect.make(src, Path(tmp) / f"{defect.name}.gguf", anchors)
            made = {defect.name: (defect, path)}
            start = time.time()
            results = corpus.run_corpus(BIN, made, src)[defect.name]
            rows[defect.name] = {"kind": defect.kind, **{tool: [o.result, o.detail] for tool, o in results.items()}}
            print(f"  {defect.name:30s} " + "  ".join(f"{tool}={o.result}" for tool, o in results.items())
                  + f"  ({time.time() - start:.1f} s)", flush=True)
            path.unlink()
    return rows


def counts(rows: dict) -> dict:
    return {tool: dict(Counter(row[tool][0] for row in rows.values())) for tool in corpus.TOOLS}


def markdown(report: dict) -> str:
    lines = [f"Malformed-file corpus (`bench/malformed.py`, generator `bench.corpus`), machine: {report['machine']}.",
             ""]
    for label, entry in report["files"].items():
        rows = entry["variants"]
        kinds = Counter(row["kind"] for row in rows.values())
        lines += [f"**{label}** `{entry['file']}`: {len(rows)} variants ({kinds['structural']} structural, "
                  f"{kinds['data']} data)", "",
                  "| tool | " + " | ".join(OUTCOMES) + " |", "|---|" + "---:|" * len(OUTCOMES)]
        for tool, by in counts(rows).items():
            lines.append(f"| {tool} | " + " | ".join(str(by.get(o, 0)) for o in OUTCOMES) + " |")
        bad = entry["failures"]
        lines += ["", "failures: " + ("none" if not bad else "; ".join(bad)), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nq", type=Path, default=DEFAULT_NQ)
    parser.add_argument("--plain", type=Path, default=DEFAULT_PLAIN)
    args = parser.parse_args(argv)
    for path in (args.nq, args.plain):
        if not path.is_file():
            sys.exit(f"{path}: no such file (the NQ default is made by `bench/quality.py --rows 'NQ 1.0 (fast preset)'`)")
    made = meta(argv)
    report = {"machine": made["machine"], "files": {}}
    for label, src in (("NQ file", args.nq), ("ordinary file", args.plain)):
        print(f"{label}: {src}", flush=True)
        rows = run_file(src)
        defects = {name: (next(d for d in corpus.DEFECTS if d.name == name), None) for name in rows}
        results = {name: {tool: corpus.Outcome(*row[tool]) for tool in corpus.TOOLS} for name, row in rows.items()}
        report["files"][label] = {"file": src.name, "variants": rows, "failures": corpus.failures(defects, results)}
    write_result(RESULTS / "malformed.json", report, made, markdown(report))
    print(markdown(report))
    return 1 if any(entry["failures"] for entry in report["files"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
