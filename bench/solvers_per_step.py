"""The per-step part of bench/solvers alone (python -m bench solvers_per_step): see bench/solvers.py, part 1."""
from bench.solvers import run_per_step as run  # noqa: F401
