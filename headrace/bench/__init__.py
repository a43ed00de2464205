"""Benchmark tools (`headrace bench serve`)."""
