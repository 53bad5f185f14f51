"""Tests of the benchmark package and its synthetic population."""
