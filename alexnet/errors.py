"""The one family of errors a person running the code can fix.

Every refusal that is about the command, the config, the data or the workdir
(not a bug in this code) is a `UserError`. `main.py` catches `UserError`
once and prints its message, which names the field or file and the fix,
without a traceback. Each cause is raised in one place.
"""


class UserError(Exception):
  """Something the user can fix; the message says what and how."""


class ConfigError(UserError):
  """A config field (or field combination) that cannot run."""


class DatasetError(UserError):
  """Missing, empty or unreadable data; the message says how to get it."""


class WorkdirError(UserError):
  """A workdir that cannot be resumed: another run's or not shared."""


class DivergedError(UserError):
  """Training produced a non-finite loss or parameters."""


class WeightsError(UserError):
  """A weights file to import that cannot be read or does not fit the net."""
