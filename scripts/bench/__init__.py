"""The sections of the attribution benchmark (scripts/bench_attribution.py runs them)."""
