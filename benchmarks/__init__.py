"""Throughput and memory benchmarks (docs/performance.md).  Not run by the tests."""
