"""Worked plug-in examples for docs/extending.md: each file is one plug-in, run by
tests/test_extending.py through the real simulation."""
