"""tdiff benchmarks: one script per comparison. Run `python -m bench [--quick] [names...]` from the repo root."""
