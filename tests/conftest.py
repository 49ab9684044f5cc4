"""Test set-up: four fake CPU devices, set before anything imports JAX.

Four devices let one process check the one-device, two-device (one tower
each) and four-device (two replicas of a tower pair) layouts side by side.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
