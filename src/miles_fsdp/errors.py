"""UserError marks the failures a user fixes (a setting, a file, a data line, a server
address, a reward function), as opposed to bugs. `miles-fsdp` prints a UserError as one
message and exits 1; any other exception keeps its traceback, since it is one to report.
Each module's error class derives from UserError and from the built-in type its callers
catch (ValueError, RuntimeError, ...)."""


class UserError(Exception):
    """A failure whose message names what is wrong (field, file, line) and how to fix it."""
