"""Benchmarks (installed as ``ireeopt.bench``; ``ireeopt bench`` runs ``compare``)."""
