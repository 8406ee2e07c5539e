"""Benchmarks and the harness the tests share: quality tables, decode and kernel speed, memory, the malformed-file
corpus and llama-server under load. Not part of the nanoquant wheel. Scripts run as `.venv/bin/python bench/X.py`
(make puts this checkout on the virtual environment's path, so `import bench.X` works from tests and scripts)."""
