"""What a finished search leaves for people: learning curves, a summary table, a timeline."""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Mapping

from cerebro_tasks.storage.store import Store
from cerebro_tasks.search.selection import epoch_value, metric_mode, rank


def summary_rows(histories: dict[str, dict[str, list[float]]], params: dict[str, dict[str, Any]], metric: str,
                 seconds: dict[str, float] | None = None, *, mode: str | None = None,
                 select: str = "last_epoch") -> list[dict[str, Any]]:
    """One row per model, best first by its selected value (``select``): configuration, epochs, the
    selected epoch, final and best value of each metric (best only where the direction is known)."""
    mode = metric_mode(metric, mode)
    rows = []
    for model_id, value in rank(histories, metric, mode, select):
        h = histories.get(model_id, {})
        row: dict[str, Any] = {"model_id": model_id, "params": params.get(model_id, {}),
                               "epochs": len(h.get(metric, [])), metric: value}
        if select == "best_epoch":
            row["selected_epoch"] = epoch_value(h, metric, mode, select)[0] + 1
        for key, series in sorted(h.items()):
            good = [v for v in series if not math.isnan(v)]
            key_mode = mode if key == metric else _known_mode(key)
            if good:
                row[f"final_{key}"] = good[-1]
                if key_mode is not None:
                    row[f"best_{key}"] = max(good) if key_mode == "max" else min(good)
        if seconds is not None:
            row["train_seconds"] = round(seconds.get(model_id, 0.0), 2)
        rows.append(row)
    for i, row in enumerate(rows):
        row["rank"] = i + 1
    return rows


def _known_mode(key: str) -> str | None:
    try:
        return metric_mode(key)
    except ValueError:  # a custom metric: its direction is only known for the selection metric
        return None


def tail_utilisation(records: list[dict[str, Any]], num_workers: int) -> dict[str, Any]:
    """Utilisation once fewer than W models have work left (the tail, where pure MOP idles workers).

    The tail starts when the W-th last model to finish ends its last unit; the figure is the busy
    worker-seconds within it over W x its length.
    """
    if not records:
        return {}
    last: dict[str, float] = {}
    for r in records:
        m = r["unit"]["model_id"]
        last[m] = max(last.get(m, r["end"]), r["end"])
    end = max(last.values())
    ends = sorted(last.values(), reverse=True)
    start = ends[num_workers - 1] if len(ends) >= num_workers else min(r["start"] for r in records)
    span = end - start
    if span <= 0:
        return {"tail_s": 0.0, "tail_utilisation": 1.0}
    busy = sum(max(0.0, min(r["end"], end) - max(r["start"], start)) for r in records)
    return {"tail_s": round(span, 3), "tail_utilisation": busy / (num_workers * span)}


def _tail_line(fig: Mapping[str, Any]) -> str:
    tail = fig.get("tail_s", float("nan"))
    if tail < 0.05:  # the last W models ended together: a utilisation over a few milliseconds says nothing
        return "no tail (the last models to finish ended together)"
    return (f"tail utilisation {fig.get('tail_utilisation', float('nan')):.1%} over the last {tail:.1f} s "
            "(fewer models left than workers)")


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """A small Markdown page: what ran, the MOP figures, and one row per model, best first."""
    key = summary["metric"]
    rows = summary["models"]
    fig = summary.get("figures") or {}
    names = sorted({k for r in rows for k in r["params"]})
    best_key = f"best_{key}"
    stops = any("stopped_after_epoch" in r or "error" in r for r in rows)
    cols = ["rank", "model_id", *names, "epochs", f"final {key}", f"best {key}", "train s", *(["ended"] if stops else [])]
    lines = [f"# {summary['search']} search `{summary['run_id']}`", "",
             f"- best model: **{summary['best_model_id']}** by {key} ({'higher' if summary['mode'] == 'max' else 'lower'}"
             " is better)",
             f"- {summary['num_models']} models x {summary['num_epochs']} epochs on {summary['num_workers']} workers, "
             f"wall {summary['wall_s']:.1f} s",
             f"- utilisation {fig.get('utilisation', float('nan')):.1%}, hop overhead "
             f"{fig.get('hop_overhead', float('nan')):.1%} of compute, makespan {fig.get('makespan_s', float('nan')):.1f} s; "
             + _tail_line(fig),
             *([f"- selected by {summary.get('select', 'last_epoch')}: epoch {summary.get('best_epoch')} of "
                f"{summary['best_model_id']}"] if summary.get("select") == "best_epoch" else []),
             *([f"- early stopping {summary['early_stopping']}: {len(summary.get('stopped_models', []))} models "
                f"stopped, {fig.get('unit_seconds', float('nan')):.1f} unit-seconds of compute in all"]
               if summary.get("early_stopping") else []),
             f"- true hop cost {_ratio(fig.get('hop_cost'))} (a unit whose model hopped in, over the same unit on a "
             f"model that stayed; model already built on the worker {_ratio(fig.get('hop_cost_warm'))}, built there "
             f"for the unit {_ratio(fig.get('hop_cost_cold'))})",
             *([f"- data and checkpoint I/O on the units' path {fig.get('checkpoint_io_s', 0.0):.1f} s; "
                f"{fig['wholes_written_behind']} whole models written behind, off it "
                f"({fig.get('whole_behind_s', 0.0):.1f} s of the workers' waiting time)"]
               if fig.get("wholes_written_behind") else []),
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ended = (f"failed: {r['error']}" if "error" in r else
                 f"stopped after epoch {r['stopped_after_epoch']}: {r['stop_reason']}" if "stopped_after_epoch" in r else "")
        cells = [r.get("rank"), r["model_id"], *(r["params"].get(n) for n in names), r.get("epochs"), r.get(key),
                 r.get(best_key), r.get("train_seconds"), *([ended] if stops else [])]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _ratio(v: Any) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def plot_learning_curves(histories: dict[str, dict[str, list[float]]], path: str, metrics: list[str] | None = None,
                         title: str = "learning curves", stopped: Mapping[str, int] | None = None) -> str:
    """One panel per metric (train dashed, validation solid), one colour per model; a PNG.

    ``stopped`` maps early-stopped models to the 0-based epoch after which they stopped: a cross
    marks that point on their validation curves."""
    stopped = stopped or {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = sorted({k.split("_", 1)[1] for h in histories.values() for k in h if "_" in k})
    metrics = metrics or keys
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4.2 * max(1, len(metrics)), 3.6), squeeze=False)
    colours = {m: plt.cm.tab20(i % 20) for i, m in enumerate(sorted(histories))}
    for ax, name in zip(axes[0], metrics):
        for model_id, h in sorted(histories.items()):
            for kind, style in (("train", "--"), ("val", "-")):
                series = h.get(f"{kind}_{name}")
                if series:
                    ax.plot(range(1, len(series) + 1), series, style, color=colours[model_id],
                            label=model_id if kind == "val" else None, marker="o", markersize=3)
                    e = stopped.get(model_id)
                    if kind == "val" and e is not None and e < len(series):
                        ax.plot([e + 1], [series[e]], "x", color=colours[model_id], markersize=9, mew=2)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), fontsize=7)
    fig.suptitle(f"{title} (dashed: train, solid: validation{', x: stopped early' if stopped else ''})")
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def publish_png(store: Store, name: str, draw) -> str:
    """Draw into a local temporary PNG and publish it atomically into the store."""
    with tempfile.TemporaryDirectory() as d:
        local = draw(os.path.join(d, name))
        store.put_file(local, name)
    return store.url_of(name)
