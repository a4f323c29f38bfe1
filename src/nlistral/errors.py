"""The errors the command line turns into a one-line message (cli.py): below every module that raises them."""


class ConfigError(ValueError):
    """A config value, file or option is wrong: exit 2 before any work."""


class StageError(RuntimeError):
    """A stage ran but its result is not acceptable (e.g. too many failed rows)."""


class DataError(Exception):
    """A bad input file. str() reads `path:line: column 'name': problem` (line/column left out where meaningless)."""

    def __init__(self, path, message, line=None, column=None):
        where = f"{path}:{line}:" if line else f"{path}:"
        if column:
            where += f" column {column!r}:"
        super().__init__(f"{where} {message}")
