"""The project's user-facing errors.

A `UserError` is a mistake the user can fix: a config value, a flag, a path,
a file in the wrong format, a workdir in use. The command-line programs
(`moco_jax.launch.cli`) print its message as one line on stderr, with no
traceback, and exit non-zero; any other exception is a bug and keeps its
traceback. Each class also derives from the built-in exception a caller would
catch for it (ValueError, FileNotFoundError, ...), so library users can keep
catching those.

Messages are one sentence that names the offending field, file or value and
says what is allowed or what to do.
"""


class UserError(Exception):
    """Base of the errors the command-line programs report in one line."""


class ConfigError(UserError, ValueError):
    """A config field or flag has a value this program cannot use."""


class InputError(UserError, ValueError):
    """A file or dataset exists but cannot be read as what it should be."""


class NotFoundError(UserError, FileNotFoundError):
    """A file, directory or dataset that was asked for does not exist."""


class PathError(UserError, OSError):
    """A path exists (or is named) but cannot be used: not writable, not a directory."""


class WorkdirError(UserError, RuntimeError):
    """The workdir cannot be used as it is: held by another run, or its
    checkpoints are unusable. The message says how to proceed."""


class DivergedError(UserError, FloatingPointError):
    """Training produced a non-finite loss or gradient."""
