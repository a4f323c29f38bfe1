"""`nlistral export DIR`: the adapter, its tokenizer and the model card as DIR/README.md, ready for the HF Hub.

Everything comes from stage outputs (models/adapter, reports/model_card.md); the folder appears complete or not at
all. The card gets a last line naming the git revision it was exported from (the report itself names none, so that
the same inputs give the same report). `hf upload REPO_ID DIR` (huggingface-hub's CLI; the pinned release has no
`huggingface-cli`) or `HfApi().upload_folder` publishes it.
"""

import shutil
from pathlib import Path

from nlistral import paths
from nlistral.data import DataError
from nlistral.paths import ADAPTER_DIR, REPORT_MODEL_CARD
from nlistral.revision import git


def export(dest) -> Path:
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(dest, "exists and is not an empty folder: export writes a new one")
    adapter, card = paths.require(ADAPTER_DIR), paths.require(REPORT_MODEL_CARD)
    staging = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(adapter, staging)
        revision = git("describe", "--always", "--dirty") or "no git revision"
        text = card.read_text(encoding="utf-8").rstrip("\n")
        stamp = f"Exported by `nlistral export` from git revision `{revision}`."
        (staging / "README.md").write_text(f"{text}\n\n{stamp}\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if dest.exists():  # an empty folder
        dest.rmdir()
    staging.rename(dest)
    print(f"export: {adapter} + {card} -> {dest} (README.md is the model card)")
    return dest
