"""Where the DeepPostures DAGs keep their data by default, and the Asset that links them.

`deeppostures_ingest` converts newly arrived H5 files and, only when the windows dataset really
changed, emits `WINDOWS_DATASET`; `deeppostures_model_selection` runs daily or on that event.
"""

from __future__ import annotations

import os

from airflow.sdk import Asset

HOME = os.environ.get("CEREBRO_HOME", os.path.expanduser("~/cerebro"))
H5_ROOT = f"{HOME}/h5"
DATASET_URL = f"{HOME}/dataset"

WINDOWS_DATASET = Asset(name="deeppostures_windows", uri=f"file://{DATASET_URL}", group="cerebro")
