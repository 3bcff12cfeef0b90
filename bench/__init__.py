"""Benchmarks of the fused PatchMerger (`python -m bench`, see `bench/suite.py`).

Not part of the installed package and not collected by the test suite (testpaths = tests);
the pytest-benchmark entries live in `bench/test_bench.py` (`pytest bench/test_bench.py`).
"""
