"""Print where a finished demo put everything, and the best model's validation figures.

    python scripts/demo_report.py CEREBRO_HOME [SECONDS]
"""

from __future__ import annotations

import json
import os
import sys


def _read(*path: str) -> str:
    with open(os.path.join(*path)) as f:
        return f.read()


def report(home: str, seconds: float | None = None) -> str:
    exports = os.path.join(home, "exports")
    run_id = _read(exports, "LATEST").strip()
    export_dir = os.path.join(exports, run_id)
    meta = json.loads(_read(export_dir, "metadata.json"))
    run_dir = os.path.join(home, "store", "runs", run_id)
    result = json.loads(_read(run_dir, "result.json"))
    predictions = os.path.join(home, "predictions", f"deeppostures-{run_id}")
    csvs = sorted(f for f in os.listdir(predictions) if f.endswith(".csv")) if os.path.isdir(predictions) else []
    h = meta["history"]
    last = {k: v[-1] for k, v in sorted(h.items()) if v and v[-1] is not None}
    lines = [
        "",
        "DeepPostures model selection finished" + (f" in {seconds:.0f} s" if seconds else "") + ".",
        f"  H5 input           {os.path.join(home, 'h5')}",
        f"  Petastorm dataset  {os.path.join(home, 'dataset')}",
        f"  run store          {run_dir}",
        f"    summary          {os.path.join(run_dir, 'summary.md')}",
        f"    learning curves  {os.path.join(run_dir, 'learning_curves.png')}",
        f"    MOP timeline     {os.path.join(run_dir, 'timeline.png')}",
        f"    checkpoints      {os.path.join(run_dir, 'models')}",
        f"  exported model     {export_dir} (model.keras, saved_model/, metadata.json)",
        f"  predictions        {predictions} ({len(csvs)} subject CSVs, parquet/)",
        "",
        f"  {result['models']} models on {meta['config']['num_workers']} workers in {result['seconds']:.0f} s; "
        f"worker utilisation {result['utilisation']:.2f}",
        f"  best model {meta['model_id']} {json.dumps(meta['params'])}",
        "  validation after the last epoch: "
        + ", ".join(f"{k[4:]}={v:.3f}" for k, v in last.items() if k.startswith("val_")),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else None))
