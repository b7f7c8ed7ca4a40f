"""Benchmarks (`make bench`): harvest and training throughput against baselines measured in the same run."""
