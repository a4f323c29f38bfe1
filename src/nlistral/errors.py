"""The two errors the command line turns into a one-line message (cli.py): below every module that raises them."""


class ConfigError(ValueError):
    """A config value, file or option is wrong: exit 2 before any work."""


class StageError(RuntimeError):
    """A stage ran but its result is not acceptable (e.g. too many failed rows)."""
