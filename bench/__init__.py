"""Benchmarks of flatmtl_fast (run ``python -m bench --help``). They measure; they never assert timings."""
