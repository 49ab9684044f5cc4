"""The data package: sources, preprocessing ops, colour statistics.

`input_pipeline.py` at the repository root holds the entry points.
"""
