"""TPE (Tree of Parzen Estimators, hyperopt's) for MOP: propose as workers free up, learn from every model.

:class:`TPEProposer` is hyperopt's TPE behind a two-call interface (``propose(n)``,
``observe(params, value)``), used by every driver (the Cerebro API's ``TPESearch`` in
:mod:`cerebro_tasks.cerebro.search`, the DeepPostures job).

How it differs from Cerebro's TPE, which proposed ``parallelism`` configurations, trained them all
to the end, and only then asked again (and returned only the last batch's histories):

* ``parallelism`` models are kept in flight. Each time one finishes, its final validation metric
  is observed and one replacement is proposed at once, while the other models keep training, so
  each new proposal uses every result so far and the workers never wait for a batch boundary.
* Configurations still being trained stay in hyperopt's trial list without a result; hyperopt's
  TPE counts such trials as bad (infinite loss), so proposals made while others run are pushed
  away from the running configurations instead of repeating them.
* The random start-up phase counts finished models, not proposals: TPE takes over after
  ``n_startup_jobs`` real results.
* ``hp_loguniform(low, high)`` means ``10 ** U(low, high)`` here as in random search, and the
  direction follows the metric: for scores (accuracy, AUC) TPE minimises ``-value``.
* Proposal ``k`` draws from a seed derived from ``(seed, k)``: the same seed and the same
  observations give the same proposals, and a resumed run that tells the proposer how many
  configurations it had proposed (``skip``) continues the sequence instead of repeating it.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np

from cerebro_tasks.search.space import Dimension, parse_space

log = logging.getLogger("cerebro_tasks.search")

__all__ = ["TPEProposer", "to_hyperopt_space"]

_LN10 = math.log(10.0)


def to_hyperopt_space(space: Mapping[str, Dimension]) -> dict[str, Any]:
    """hyperopt expressions with the same meaning as :meth:`Dimension.sample` (base-10 log dims)."""
    from hyperopt import hp

    out: dict[str, Any] = {}
    for name, d in space.items():
        if d.kind == "choice":
            out[name] = hp.choice(name, list(d.args[0]))
        elif d.kind == "uniform":
            out[name] = hp.uniform(name, *d.args)
        elif d.kind == "quniform":
            out[name] = hp.quniform(name, *d.args)
        elif d.kind == "loguniform":
            # hyperopt's loguniform is exp(U(low, high)); ours is 10 ** U(low, high)
            low, high = d.args
            out[name] = hp.loguniform(name, low * _LN10, high * _LN10)
        elif d.kind == "qloguniform":
            low, high, q = d.args
            out[name] = hp.qloguniform(name, low * _LN10, high * _LN10, q)
        else:
            raise ValueError(f"search space parameter {name!r}: TPE cannot handle dimension kind {d.kind!r}")
    return out


class TPEProposer:
    """hyperopt's TPE as ``propose(n) -> [params]`` and ``observe(params, value)``.

    ``metric_mode`` is ``"min"`` for losses and ``"max"`` for scores (see
    :func:`cerebro_tasks.search.selection.metric_mode`). ``observe`` accepts configurations this
    proposer made (pending ones are matched by value, oldest first) and outside ones (a resumed
    run's earlier models): both count. A NaN or infinite value marks a failed model: TPE treats it
    as bad. Not thread-safe: call it from one driver thread.
    """

    def __init__(self, space: Mapping[str, Any], *, seed: int, metric_mode: str = "min",
                 n_startup_jobs: int = 10, n_ei_candidates: int = 24, gamma: float = 0.25) -> None:
        from hyperopt import Trials
        from hyperopt.base import Domain

        if metric_mode not in ("min", "max"):
            raise ValueError(f"metric_mode must be 'min' or 'max', got {metric_mode!r}")
        if n_startup_jobs < 1:
            raise ValueError(f"n_startup_jobs must be >= 1, got {n_startup_jobs!r}")
        self.space = parse_space(dict(space))
        self.metric_mode = metric_mode
        self.n_startup_jobs = int(n_startup_jobs)
        self.n_ei_candidates = int(n_ei_candidates)
        self.gamma = float(gamma)
        # the objective is never called: models are trained by MOP, results come back via observe()
        self._domain = Domain(lambda _params: 0.0, to_hyperopt_space(self.space))
        self._trials = Trials()
        self._seed = int(seed)
        self.num_proposed = 0  # proposals made (and skipped on resume): numbers the next draw
        self._pending: dict[int, dict[str, Any]] = {}  # tid -> params, in proposal order
        self._observed = 0
        self._observations: list[tuple[dict[str, Any], float]] = []

    # ----------------------------------------------------------------------------------------------
    @property
    def num_observed(self) -> int:
        """Configurations with a finite observed value (what TPE learns from)."""
        return self._observed

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def observations(self) -> list[tuple[dict[str, Any], float]]:
        """Every observed (params, value), in observation order; failed ones have NaN."""
        return [(dict(p), v) for p, v in self._observations]

    def propose(self, n: int) -> list[dict[str, Any]]:
        """``n`` new configurations; random until ``n_startup_jobs`` results are in, then TPE."""
        from hyperopt import rand, tpe

        out = []
        for _ in range(max(0, int(n))):
            tids = self._trials.new_trial_ids(1)
            seed = int(np.random.SeedSequence([self._seed, self.num_proposed]).generate_state(1)[0] & 0x7FFFFFFF)
            self.num_proposed += 1
            if self._observed < self.n_startup_jobs:
                docs = rand.suggest(tids, self._domain, self._trials, seed)
            else:
                docs = tpe.suggest(tids, self._domain, self._trials, seed, n_startup_jobs=0,
                                   n_EI_candidates=self.n_ei_candidates, gamma=self.gamma, verbose=False)
            self._trials.insert_trial_docs(docs)
            self._trials.refresh()
            params = self._params_of(docs[0]["misc"]["vals"])
            self._pending[tids[0]] = params
            out.append(params)
        return out

    def observe(self, params: Mapping[str, Any], value: float) -> None:
        """Record the result of a configuration (lower is better when ``metric_mode == 'min'``)."""
        from hyperopt import JOB_STATE_DONE, STATUS_FAIL, STATUS_OK

        params = dict(params)
        missing = sorted(set(self.space) - set(params))
        if missing:
            raise ValueError(f"observe(): params lack {missing}; expected every parameter of the space "
                             f"{sorted(self.space)}, got {sorted(params)}")
        params = {k: params[k] for k in self.space}
        tid = next((t for t, p in self._pending.items() if p == params), None)
        if tid is None:
            doc = self._outside_trial(params)
        else:
            del self._pending[tid]
            doc = next(d for d in self._trials._dynamic_trials if d["tid"] == tid)
        value = float(value)
        self._observations.append((params, value if math.isfinite(value) else math.nan))
        if math.isfinite(value):
            loss = value if self.metric_mode == "min" else -value
            doc["result"] = {"status": STATUS_OK, "loss": loss, "value": value}
            self._observed += 1
        else:
            doc["result"] = {"status": STATUS_FAIL, "value": math.nan}
        doc["state"] = JOB_STATE_DONE
        self._trials.refresh()

    def add_pending(self, params: Mapping[str, Any]) -> None:
        """A configuration proposed by an earlier attempt of the run and still training (resume):
        it counts as proposed and, until observed, as running (bad) for TPE."""
        params = {k: dict(params)[k] for k in self.space}
        doc = self._outside_trial(params)
        self._pending[doc["tid"]] = params
        self.num_proposed += 1

    def skip(self, n: int) -> None:
        """Count ``n`` proposals made by an earlier attempt that finished (observed separately)."""
        self.num_proposed += int(n)

    # ----------------------------------------------------------------------------------------------
    def _outside_trial(self, params: dict[str, Any]) -> dict[str, Any]:
        """Insert a trial for a configuration that this proposer did not make."""
        tid = self._trials.new_trial_ids(1)[0]
        vals: dict[str, list[Any]] = {}
        for name, d in self.space.items():
            v = params[name]
            if d.kind == "choice":
                options = list(d.args[0])
                if v not in options:
                    raise ValueError(f"observe(): {name}={v!r} is not one of the choices {options}")
                v = options.index(v)  # hyperopt stores the index of a choice
            vals[name] = [v]
        misc = {"tid": tid, "cmd": self._domain.cmd, "workdir": self._domain.workdir,
                "idxs": {k: [tid] for k in vals}, "vals": vals}
        docs = self._trials.new_trial_docs([tid], [None], [self._domain.new_result()], [misc])
        self._trials.insert_trial_docs(docs)
        self._trials.refresh()
        return next(d for d in self._trials._dynamic_trials if d["tid"] == tid)

    def _params_of(self, vals: Mapping[str, list[Any]]) -> dict[str, Any]:
        """hyperopt's stored values as the values ``Dimension.sample`` would give (choices, ints)."""
        out: dict[str, Any] = {}
        for name, d in self.space.items():
            v = vals[name][0]
            if hasattr(v, "item"):
                v = v.item()
            if d.kind == "choice":
                v = d.args[0][int(v)]
            elif d.kind in ("quniform", "qloguniform"):
                q = d.args[-1]
                v = round(float(v) / q) * q  # hyperopt already rounds; this only cleans float noise
                v = int(round(v)) if float(q).is_integer() else float(v)
            else:
                v = float(v)
            out[name] = v
        return out
