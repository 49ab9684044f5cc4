"""Experiments built on the alexnet library (figures of the paper)."""
