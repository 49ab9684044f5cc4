"""Test set-up: four fake CPU devices, set before anything imports JAX.

Four devices let one process check the one-device, two-device (one tower
each) and four-device (two replicas of a tower pair) layouts side by side.
A persistent compilation cache lets the many short training runs (and the
`main.py` subprocesses, which inherit the environment) compile each step
once per session.
"""

import os
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      tempfile.mkdtemp(prefix='alexnet-jax-cache-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
