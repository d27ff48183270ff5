"""Benchmarks: copy kernels, victim selection, the real-engine runner and the scheduler simulator."""
