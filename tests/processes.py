"""A repository script run as a real process, for the fault tests."""

import os
import re
import subprocess
import sys
import time

TIMEOUT = 300  # Seconds any one process may take before the test fails.


class LoggedProcess:
  """`python SCRIPT ARGS` from the repository root, logging to a file.

  JAX runs on `devices` fake CPU devices; `env` adds environment variables
  (e.g. tests/fault_worker.py's FAULT_* settings).
  """

  def __init__(self, repo, log, *args, script='main.py', devices=4, **env):
    self.log = log
    environ = dict(os.environ, JAX_PLATFORMS='cpu',
                   XLA_FLAGS=f'--xla_force_host_platform_device_count='
                   f'{devices}', **{k: str(v) for k, v in env.items()})
    with open(log, 'w') as out:
      self.process = subprocess.Popen(
          [sys.executable, os.path.join(repo, *script.split('/')), *args],
          cwd=repo, env=environ, stdout=out, stderr=subprocess.STDOUT)

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
