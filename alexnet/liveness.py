"""Whether a process recorded by its host and pid is still the one recorded.

A pid names a process only on its machine, and only until it is reused.
`this_machine` names where this process's pids can be looked up (host, boot
id and pid namespace: containers share their host's name, not its pids),
and `process_identity` what tells a process from a later one with the same
pid (its start time). The workdir lock (alexnet/workdir_lock.py) records
both for its holder, to tell a dead holder from a live one.
"""

import os
import socket


def _read_text(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ''


def _boot_id() -> str:
  return _read_text('/proc/sys/kernel/random/boot_id')


def _pid_namespace() -> str:
  try:
    return os.readlink('/proc/self/ns/pid')
  except OSError:
    return ''


def this_machine() -> dict[str, str]:
  """Where this process's pids mean something: host, boot and namespace.

  Returns:
    {'host', 'boot', 'pid_namespace'}: the hostname, the boot id and the
    pid namespace (Linux; '' where there is no procfs).
  """
  return {'host': socket.gethostname(), 'boot': _boot_id(),
          'pid_namespace': _pid_namespace()}


def process_identity(pid: int) -> str | None:
  """What tells process `pid` apart from a later one with the same pid.

  Args:
    pid: a process id on this host.

  Returns:
    None if no such process runs (or it is a zombie). On Linux, the boot id
    and the process start time; elsewhere '' for any live process.
  """
  if not os.path.isdir('/proc/self'):  # No procfs: the pid alone.
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return None
    except PermissionError:
      pass  # Alive, but another user's.
    return ''
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
  except OSError:
    return None
  # Fields after the command name (which may hold spaces and parentheses):
  # state is field 3, starttime field 22.
  fields = stat[stat.rindex(')') + 2:].split()
  if fields[0] in ('Z', 'X'):  # Killed, not yet reaped by its parent.
    return None
  return f'{_boot_id()}/{fields[19]}'
