"""One module per DVC stage; each exposes `run(cfg)` or `run(cfg, split)`."""


class StageError(RuntimeError):
    """A stage ran but its result is not acceptable (e.g. too many failed rows)."""
