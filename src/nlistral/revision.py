"""The one way the code asks git about the checkout it runs in (MLflow tags, the exported card's provenance)."""

import subprocess


def git(*args) -> str | None:
    """`git ARGS` in the working directory, its output stripped; None outside a repository or without git."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
