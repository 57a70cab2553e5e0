"""Throughput and memory benchmarks (SPEC §9).  Not run by the tests."""
