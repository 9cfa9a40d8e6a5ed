"""Error types that map to the shell's exit codes: 2 for bad usage/config, 1 for runtime failures."""


class SnapgenError(Exception):
    """A runtime failure with a clear one-line message (exit code 1)."""

    exit_code = 1


class ConfigError(SnapgenError):
    """Bad user input: a recipe key, a flag, a path, a preset (exit code 2).

    The message names the offending key path or file and what was expected, e.g.
    ``stages[2].lr: expected a positive number, got "fast"``.
    """

    exit_code = 2
