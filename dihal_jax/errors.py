"""The one exception type for bad user input.

Library code raises `UserInputError` with a message that names the file, field
or value and what was expected; `dihal_jax.cli` prints it as a single line on
stderr and exits with status 2 (no traceback). Everything else is a bug and
keeps its traceback.
"""


class UserInputError(Exception):
  """Bad input (file, field, value) that the user can fix."""
