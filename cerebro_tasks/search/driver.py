"""The one search driver: a searcher and a stopping rule connected to the MOP engine, and the finish.

Both entry points are thin adapters over :class:`SearchDriver`: the DeepPostures job
(:mod:`cerebro_tasks.jobs.train`) and Cerebro's API (:mod:`cerebro_tasks.cerebro.search`). They
say how a configuration becomes a model (``new_model(index, params) -> ModelSpec``) and what the
result looks like to their users; everything else is decided here, once:

* which configurations train and when: the searcher proposes them, keeping ``parallelism`` models
  in flight (grid and random: all at once unless limited; TPE: the number of workers), and at
  least W (the workers) while configurations remain when early stopping is on, so a stopped
  model's workers always have another model to take (ASHA's remedy for idle workers);
* early stopping: after each epoch a model validates, the stopping rule says go on or stop; a
  stop goes to the hop scheduler at once (``MopDriver.stop``). Every decision and the rule's state
  are written to ``search_state.json`` before the scheduler hears of it, so a resumed run restores
  the rule and answers the epochs it already decided from that record: nothing is decided twice;
* what the searcher learns: a finished or stopped model's selection value; a failed model as a
  failure (TPE counts it bad), never its partial metrics;
* the finish: the best model and epoch (``select``), the summary with each model's stop or error,
  the plots, TensorBoard, and :class:`SearchOutcome` for the adapter;
* resume: :func:`check_same_run` refuses to continue a run with another configuration or data.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from cerebro_tasks.errors import ConfigError
from cerebro_tasks.mop.workload import ModelSpec
from cerebro_tasks.search.searcher import Searcher
from cerebro_tasks.search.selection import SELECTS, epoch_value, metric_mode
from cerebro_tasks.search.stopping import StoppingRule, make_stopping_rule
from cerebro_tasks.storage import layout
from cerebro_tasks.storage.store import Store

log = logging.getLogger("cerebro_tasks.search")

__all__ = ["SearchDriver", "SearchOutcome", "SearchError", "check_same_run"]


class SearchError(RuntimeError):
    """The search ran but has nothing to choose from (every model failed or reached no value)."""

_TERMINAL = ("done", "stopped", "failed")


@dataclass
class SearchOutcome:
    """What a finished search chose, for the adapter to present."""

    best_model_id: str
    best_epoch: int  # 0-based epoch whose value (and checkpoint) was selected
    best_value: float
    best_step: int  # the checkpoint of that epoch: ckpt-<(best_epoch + 1) * W>
    metric: str
    select: str
    summary: dict[str, Any]
    selected_epochs: dict[str, int] = field(default_factory=dict)  # every usable model -> its selected epoch


class SearchDriver:
    """Runs one search on a :class:`~cerebro_tasks.mop.runtime.MopDriver`; see the module docstring.

    Args:
        mop: the engine, not yet resumed.
        searcher: proposes configurations (:func:`cerebro_tasks.search.searcher.make_searcher`).
        new_model: ``(index, params) -> ModelSpec``; index numbers the models from 0 in proposal order.
        metric_keys: history keys of the selection metric, first found wins (Cerebro's ``acc`` may be
            recorded as ``val_acc`` or ``val_accuracy``).
        mode: the metric's direction; ``select``: ``"last_epoch"`` or ``"best_epoch"``.
        early_stopping: the JSON form of a stopping rule, or None.
        parallelism: models in flight; None: all configurations at once (grid, random).
        on_model_done: ``(model_id, state, value)`` for the adapter's progress log.
    """

    def __init__(self, mop: Any, searcher: Searcher, *, new_model: Callable[[int, dict[str, Any]], ModelSpec],
                 num_epochs: int, metric_keys: Sequence[str], mode: str, select: str = "last_epoch",
                 early_stopping: Mapping[str, Any] | None = None, parallelism: int | None = None,
                 on_model_done: Callable[[str, str, float], None] | None = None) -> None:
        if select not in SELECTS:
            raise ConfigError(f"select: expected one of {SELECTS}, got {select!r}")
        self.mop = mop
        self.searcher = searcher
        self.new_model = new_model
        self.num_epochs = int(num_epochs)
        self.metric_keys = list(metric_keys)
        self.mode = metric_mode(self.metric_keys[0], mode)
        self.select = select
        self.early_stopping = dict(early_stopping) if early_stopping else None
        self.rule: StoppingRule | None = None
        if self.early_stopping:
            try:
                self.rule = make_stopping_rule(self.early_stopping, mode=self.mode, max_epochs=self.num_epochs)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        W = mop.num_workers
        if self.rule is not None:  # a model waits at each decision epoch for its validation
            mop.epoch_gates = self.rule.decision_epochs()
        # with early stopping a limited search keeps at least W models in flight while configurations remain
        self.parallelism = max(parallelism, W) if self.rule is not None and parallelism is not None else parallelism
        self._on_model_done = on_model_done
        self.run_store: Store = mop.store
        self.metric: str | None = None  # the resolved history key
        self.decisions: dict[tuple[str, int], dict[str, Any]] = {}
        self.stopped: dict[str, dict[str, Any]] = {}  # model -> its stop decision
        self._completed: set[str] = set()
        self.best_so_far: tuple[str, float] | None = None

    # starting -------------------------------------------------------------------------------------
    def start(self) -> int:
        """Resume whatever an earlier attempt left, then add the first models; returns models known before."""
        mop = self.mop
        mop.resume()
        known = list(mop.specs.values())
        finished = {i for i, s in enumerate(known) if mop.scheduler.model_status(s.model_id).state in _TERMINAL}
        self.searcher.load_state_dict({"proposed": [dict(s.params) for s in known]}, finished=finished)
        self._load_state()
        for model_id, d in self.stopped.items():
            if model_id in mop.specs:
                mop.stop(model_id)
        active = sum(1 for s in known if mop.scheduler.model_status(s.model_id).state not in _TERMINAL)
        for spec in self._more(active):
            mop.add(spec)
        if not mop.specs:
            raise ValueError("nothing to train: the search space gave no configurations")
        return len(known)

    def run(self) -> Any:
        """Train until every model is done, stopped or failed; the engine's MopResult."""
        return self.mop.run(self._model_done, self._epoch_done if self.rule is not None else None)

    def _more(self, in_flight: int) -> list[ModelSpec]:
        room = self.searcher.remaining if self.parallelism is None else self.parallelism - in_flight
        start = len(self.mop.specs)
        return [self.new_model(start + i, p) for i, p in enumerate(self.searcher.propose(room))]

    # events from the engine --------------------------------------------------------------------------
    def resolve_metric(self, history: Mapping[str, Any]) -> str | None:
        if self.metric is None:
            self.metric = next((k for k in self.metric_keys if k in history), None)
        return self.metric

    def _epoch_done(self, model_id: str, epoch: int, history: dict[str, list[float]]) -> bool:
        assert self.rule is not None
        recorded = self.decisions.get((model_id, epoch))
        if recorded is not None:  # decided before a resume: the same answer, the rule is not asked again
            return bool(recorded["stop"])
        key = self.resolve_metric(history)
        series = history.get(key, []) if key else []
        value = float(series[epoch]) if len(series) > epoch and series[epoch] is not None else math.nan
        decision = self.rule.on_result(model_id, epoch, value)
        others = []
        for other, reason in decision.others:  # models this result pushed out (ASHA revises provisional passes)
            status = self.mop.scheduler.model_status(other)
            if other not in self.stopped and status.state not in _TERMINAL:
                others.append({"model_id": other, "epoch": max(status.validated_epochs, default=-1), "reason": reason})
        record = {"model_id": model_id, "epoch": epoch, "value": value, "stop": decision.stop,
                  "reason": decision.reason, "others": others}
        self.decisions[(model_id, epoch)] = record
        self._note_stops(record)
        self._save_state()  # before the scheduler hears of it: a resumed run replays, never re-decides
        for o in others:
            self.mop.stop(o["model_id"])
        return decision.stop

    def _note_stops(self, record: Mapping[str, Any]) -> None:
        """Remember the models a decision stopped: where (after which epoch, 0-based) and why."""
        stops = ([{"model_id": record["model_id"], "epoch": record["epoch"], "reason": record["reason"]}]
                 if record["stop"] else []) + list(record.get("others", []))
        for s in stops:
            self.stopped[s["model_id"]] = {"epoch": int(s["epoch"]), "reason": s["reason"]}
            log.info("early stopping: %s stops after epoch %d: %s", s["model_id"], int(s["epoch"]) + 1, s["reason"])

    def _model_done(self, model_id: str, history: dict[str, list[float]]) -> list[ModelSpec]:
        mop = self.mop
        spec = mop.specs[model_id]
        self._completed.add(model_id)
        state = mop.scheduler.model_status(model_id).state
        key = self.resolve_metric(history)
        _, value = epoch_value(history, key, self.mode, self.select) if key else (-1, math.nan)
        if state == "failed":
            self.searcher.observe_failure(spec.params, _model_error(mop, model_id))
        else:
            self.searcher.observe(spec.params, value)
            if not math.isnan(value) and (self.best_so_far is None or _better(value, self.best_so_far[1], self.mode)):
                self.best_so_far = (model_id, value)
        if key is None and state == "done":
            log.warning("model %s has none of %s; it recorded %s", model_id, self.metric_keys, sorted(history))
        self._write_tensorboard(model_id, spec, history, key)
        if self._on_model_done is not None:
            self._on_model_done(model_id, state, value)
        in_flight = len(mop.specs) - len(self._completed)
        return self._more(in_flight)

    def _write_tensorboard(self, model_id: str, spec: ModelSpec, history: dict[str, list[float]],
                           key: str | None) -> None:
        from cerebro_tasks.search.tensorboard import write_tensorboard

        params = dict(spec.params)
        notes = {}
        if self.rule is not None:  # HParams columns saying where each model ended; the Text tab says why
            params["epochs_trained"] = len(history.get(key, [])) if key else 0
            params["stopped_early"] = model_id in self.stopped
            if model_id in self.stopped:
                stop = self.stopped[model_id]
                notes["early_stopping"] = (stop["epoch"] + 1, f"stopped after epoch {stop['epoch'] + 1}: {stop['reason']}")
        try:
            write_tensorboard(self.run_store.url, model_id, params, history, key, notes=notes)
        except Exception:  # logs are worth a warning, never the search
            log.exception("could not write the TensorBoard logs of %s", model_id)

    # the stopping rule's record ------------------------------------------------------------------------
    def _save_state(self) -> None:
        assert self.rule is not None
        self.run_store.write_json({"early_stopping": self.early_stopping, "rule": self.rule.state_dict(),
                                   "decisions": list(self.decisions.values())}, layout.SEARCH_STATE)

    def _load_state(self) -> None:
        if not self.run_store.exists(layout.SEARCH_STATE):
            return
        saved = self.run_store.read_json(layout.SEARCH_STATE)
        if self.rule is None or saved.get("early_stopping") != self.early_stopping:
            raise ConfigError(f"{self.run_store.url_of(layout.SEARCH_STATE)}: the run was started with early_stopping="
                              f"{saved.get('early_stopping')}, this attempt has {self.early_stopping}; resume it with "
                              "the same setting, or use a new run id")
        self.rule.load_state_dict(saved["rule"])
        for d in saved["decisions"]:
            self.decisions[(d["model_id"], int(d["epoch"]))] = d
            self._note_stops(d)
        log.info("early stopping resumed: %d decisions on record, %d models stopped", len(self.decisions),
                 len(self.stopped))

    # the finish ----------------------------------------------------------------------------------------
    def finish(self, result: Any, *, search: str, run_id: str, wall_s: float, seed: int,
               extra: Mapping[str, Any] | None = None, plots: bool = True) -> SearchOutcome:
        """Choose the best model and epoch; write summary.json/md and (``plots``) learning_curves.png and
        timeline.png (drawing them costs seconds of matplotlib)."""
        from cerebro_tasks.mop.timeline import plot_timeline
        from cerebro_tasks.search.report import (plot_learning_curves, publish_png, summary_markdown, summary_rows,
                                                 tail_utilisation)

        run = self.run_store
        W = self.mop.num_workers
        histories = result.histories
        for model_id in result.specs:
            histories.setdefault(model_id, {})
        failed = list(result.failed_models)
        if failed and len(failed) == len(histories):
            raise SearchError(f"every model failed ({len(failed)} of {len(histories)} failed: "
                              f"{'; '.join(_first_line(self._error(result, m)) for m in failed[:3])}); the journal in "
                              f"{run.url} and the driver log say more")
        key = self.metric
        if key is None or not any(key in h for h in histories.values()):
            seen = sorted({k for h in histories.values() for k in h})
            raise ValueError(f"metric {' or '.join(self.metric_keys)}: no model recorded it; metrics recorded: {seen} "
                             "(compile the model with this metric, or pick one of these)")
        usable = {m: h for m, h in histories.items() if m not in failed}
        chosen = {m: epoch_value(h, key, self.mode, self.select) for m, h in usable.items()}
        scored = [(m, e, v) for m, (e, v) in chosen.items() if not math.isnan(v)]
        if not scored:
            raise SearchError(f"no model reached a value of {key} ({len(failed)} of {len(histories)} failed: "
                              f"{'; '.join(_first_line(self._error(result, m)) for m in failed[:3])}); the journal "
                              f"in {run.url} and the driver log say why")
        sign = -1.0 if self.mode == "max" else 1.0
        best, best_epoch, best_value = min(scored, key=lambda mev: sign * mev[2])  # ties: the first model
        params = {m: s.params for m, s in result.specs.items()}
        seconds: dict[str, float] = {}
        for r in result.records:
            seconds[r["unit"]["model_id"]] = seconds.get(r["unit"]["model_id"], 0.0) + r["end"] - r["start"]
        rows = summary_rows(histories, params, key, seconds, mode=self.mode, select=self.select)
        for row in rows:
            m = row["model_id"]
            if m in self.stopped:
                row["stopped_after_epoch"] = int(self.stopped[m]["epoch"]) + 1
                row["stop_reason"] = self.stopped[m]["reason"]
            if m in failed:
                row["error"] = _first_line(self._error(result, m))
                row["error_details"] = f"{run.url_of(layout.JOURNAL_DIR)} and the driver log"
        figures = dict(result.figures)
        figures.update(tail_utilisation(result.records, W))
        figures["unit_seconds"] = round(sum(seconds.values()), 3)
        summary = {"search": search, "run_id": run_id, "run_url": run.url_of(), "metric": key, "mode": self.mode,
                   "select": self.select, "early_stopping": self.early_stopping, "best_model_id": best,
                   "best_epoch": best_epoch + 1, "best_value": best_value, "num_models": len(result.specs),
                   "num_epochs": self.num_epochs, "num_workers": W, "seed": seed, "wall_s": wall_s,
                   "figures": figures, "failed_models": failed, "stopped_models": sorted(self.stopped),
                   "models": rows, **(extra or {})}
        run.write_json(summary, layout.SUMMARY_JSON)
        run.write_bytes(summary_markdown(summary).encode(), layout.SUMMARY_MD)
        stops = {m: int(d["epoch"]) for m, d in self.stopped.items()}
        if plots:
            publish_png(run, layout.LEARNING_CURVES_PNG,
                        lambda p: plot_learning_curves(histories, p, title=f"{search} search {run_id}", stopped=stops))
        if plots and result.records:
            publish_png(run, layout.TIMELINE_PNG,
                        lambda p: plot_timeline(result.records, p, title=f"MOP timeline {run_id}"))
        return SearchOutcome(best_model_id=best, best_epoch=best_epoch, best_value=best_value,
                             best_step=(best_epoch + 1) * W, metric=key, select=self.select, summary=summary,
                             selected_epochs={m: e for m, e, _ in scored})


    def _error(self, result: Any, model_id: str) -> str:
        # the engine's account: the last error's first line and the file with every traceback
        failure = (getattr(result, "failures", None) or {}).get(model_id)
        if failure:
            return f"{failure['error']} (tracebacks: {failure['traceback']})"
        return _model_error(result if getattr(result, "errors", None) else self.mop, model_id)


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _model_error(source: Any, model_id: str) -> str:
    """The error a failed model reported (``errors`` of the engine's result or driver), or where to look."""
    errors = getattr(source, "errors", None) or {}
    return str(errors.get(model_id) or f"model {model_id} failed; see the driver log")


def _first_line(text: str) -> str:
    """The line that says what went wrong: the first, or a traceback's last (the exception)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


def check_same_run(run: Store, config: Mapping[str, Any], data: Mapping[str, Any] | None = None, *,
                   ignore: Sequence[str] = ("max_job_attempts",)) -> None:
    """A run may be resumed (same run id) only with the configuration and data that started it.

    Records both in ``config.json`` the first time; checked before any Spark job: a resumed run on
    other data (the split re-run after new subjects arrived, other Parquet in a Cerebro store)
    would mix models trained on different data. ``ignore`` names settings a retry may change.
    """
    config = json.loads(json.dumps(dict(config), default=str))  # as it reads back (tuples as lists)
    data = json.loads(json.dumps(dict(data), default=str)) if data is not None else None
    if run.exists(layout.CONFIG):
        saved = run.read_json(layout.CONFIG)
        before, now = saved["config"], config
        changed = sorted(k for k in set(before) | set(now) if k not in ignore and before.get(k) != now.get(k))
        if changed:
            raise ConfigError(f"{run.url_of(layout.CONFIG)}: run {run.url.rstrip('/').rsplit('/', 1)[-1]!r} was started "
                              f"with other {', '.join(changed)}; resume it with the same configuration, or use a new "
                              "run id")
        if saved.get("data") is not None and data is not None and saved["data"] != data:
            raise ConfigError(f"{run.url_of(layout.CONFIG)}: run {run.url.rstrip('/').rsplit('/', 1)[-1]!r} was started "
                              f"on another split of the data ({saved['data']}, now {data}); resume it on the same "
                              "data, or use a new run id")
    run.write_json({"config": config, "data": data}, layout.CONFIG)
