"""Tests of the speed benches' arithmetic (bench/train_step.py).

The figures themselves are printed by the benches, never asserted.
"""

import pytest

from bench import train_step


def test_ratios_are_the_median_of_per_round_ratios():
  # Per-round ratios JAX/eager: 2, 1, 0.5 -> 1. The ratio of the medians
  # (20 / 30) would mix rounds run under different loads.
  figures = {'JAX': [10.0, 30.0, 20.0], 'eager': [5.0, 30.0, 40.0],
             'compile': [20.0, 60.0, 40.0]}
  summary = train_step.summarise(figures)
  assert list(summary) == ['JAX', 'eager', 'compile']
  assert summary['JAX'] == (20.0, None)
  assert summary['eager'] == (30.0, pytest.approx(1.0))
  assert summary['compile'] == (40.0, pytest.approx(0.5))


def test_rounds_must_pair_up():
  with pytest.raises(ValueError):
    train_step.summarise({'JAX': [1.0, 2.0], 'eager': [1.0]})
