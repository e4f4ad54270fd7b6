"""Benchmarks (see README.md); scripts run as `python bench/NAME.py`."""
