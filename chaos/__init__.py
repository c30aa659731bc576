"""
The chaos checker: many simulated tabs against real servers, faults injected from a seed, and a
check of the whole history afterwards (exactly once, in order, no gap, nothing left behind).
Run it with `python -m chaos --help`.
"""
