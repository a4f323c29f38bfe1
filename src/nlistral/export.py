"""`nlistral export DIR`: the adapter, its tokenizer and the model card as DIR/README.md, ready for the HF Hub.

Everything comes from stage outputs (models/adapter, reports/model_card.md); the folder appears complete or not at
all. `huggingface-cli upload <repo> DIR` (or `HfApi().upload_folder`) publishes it.
"""

import shutil
from pathlib import Path

from nlistral import paths
from nlistral.data import DataError
from nlistral.paths import ADAPTER_DIR, ADAPTER_MLFLOW_RUN, REPORT_MODEL_CARD

LOCAL_ONLY = {ADAPTER_MLFLOW_RUN.name}  # this machine's MLflow run id means nothing on the Hub


def export(dest) -> Path:
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(dest, "exists and is not an empty folder: export writes a new one")
    adapter, card = paths.require(ADAPTER_DIR), paths.require(REPORT_MODEL_CARD)
    staging = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(adapter, staging, ignore=lambda _, names: [n for n in names if n in LOCAL_ONLY])
        shutil.copyfile(card, staging / "README.md")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if dest.exists():  # an empty folder
        dest.rmdir()
    staging.rename(dest)
    print(f"export: {adapter} + {card} -> {dest} (README.md is the model card)")
    return dest
