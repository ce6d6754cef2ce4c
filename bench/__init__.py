"""Benchmarks: the cost of each distiller and the SmallDigits comparison."""
