"""Benchmarks: ``python -m benchmarks.<name>`` (each writes json + markdown into benchmarks/results)."""
