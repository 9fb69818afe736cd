"""The file spark-submit runs: `spark-submit .../cerebro_tasks/spark_entry.py <step> [args]`.

spark-submit runs a Python application as a script, which puts the script's folder first on
sys.path; it is removed here so this package's module names cannot shadow installed ones.
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from cerebro_tasks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
