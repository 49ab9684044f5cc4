"""A repository script run as a real process, for the fault tests."""

import os
import re
import subprocess
import sys
import time

TIMEOUT = 300  # Seconds any one process may take before the test fails.


def environment(devices: int, **extra) -> dict[str, str]:
  """This process's environment for a child JAX on `devices` fake CPU
  devices, with the tests' other XLA flags (conftest.py): a child's
  programs are compiled as this process's are, bit for bit."""
  flags = [flag for flag in os.environ.get('XLA_FLAGS', '').split()
           if not flag.startswith('--xla_force_host_platform_device_count')]
  flags.append(f'--xla_force_host_platform_device_count={devices}')
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(flags),
              **{k: str(v) for k, v in extra.items()})


class LoggedProcess:
  """`python SCRIPT ARGS` from the repository root, logging to a file.

  JAX runs on `devices` fake CPU devices; `env` adds environment variables
  (e.g. tests/fault_worker.py's FAULT_* settings).
  """

  def __init__(self, repo, log, *args, script='main.py', devices=4, **env):
    self.log = log
    with open(log, 'w') as out:
      self.process = subprocess.Popen(
          [sys.executable, os.path.join(repo, *script.split('/')), *args],
          cwd=repo, env=environment(devices, **env), stdout=out,
          stderr=subprocess.STDOUT)

  def text(self) -> str:
    with open(self.log) as f:
      return f.read()

  def wait_for(self, pattern: str) -> None:
    """Polls the log until `pattern` appears (fails if the process ends)."""
    deadline = time.monotonic() + TIMEOUT
    while not re.search(pattern, self.text()):
      assert self.process.poll() is None, self.text()[-3000:]
      assert time.monotonic() < deadline, f'no {pattern!r} in the log'
      time.sleep(0.01)

  def wait(self) -> int:
    try:
      return self.process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      self.process.kill()
      raise
