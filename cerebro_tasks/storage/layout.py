"""The run's on-disk layout: every file a search leaves in ``<store>/runs/<run_id>/``, named once.

::

    config.json           the run configuration and the data split it trained on (resume checks it)
    run.json              the models the MOP driver was given (resume restores them)
    run.lock              held by the one driver running the run (heartbeat)
    journal/              one record per finished unit
    models/<model_id>/    ckpt-<step>.state (weights + optimizer state after every train unit: what a
                          hop moves), ckpt-<step>.keras (the whole model, at every epoch's end); while
                          the driver has not accepted the unit that wrote them, ckpt-<step>.<attempt>.*;
                          the Cerebro API's init.keras, estimator.pkl, model_info.json
    tb/<model_id>/        TensorBoard events
    search_state.json     the stopping rule's state and every early-stopping decision (resume)
    errors/<model_id>.txt the full tracebacks of a model's failed units (the summary names the file)
    history.json, timeline.json, summary.json, summary.md, learning_curves.png, timeline.png
    result.json           the small result the DAG passes on

Every writer and reader of these names imports them from here, so the layout has one owner.
"""

from __future__ import annotations

import re

CONFIG = "config.json"
RUN = "run.json"
RUN_LOCK = "run.lock"
JOURNAL_DIR = "journal"
MODELS_DIR = "models"
ERRORS_DIR = "errors"
TB_DIR = "tb"
HISTORY = "history.json"
TIMELINE = "timeline.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
LEARNING_CURVES_PNG = "learning_curves.png"
TIMELINE_PNG = "timeline.png"
RESULT = "result.json"
SEARCH_STATE = "search_state.json"
# the Cerebro API publishes each estimator into its model folder before MOP trains it
INIT_MODEL = "init.keras"
ESTIMATOR_EXTRAS = "estimator.pkl"
MODEL_INFO = "model_info.json"


def model_file(model_id: str, name: str) -> tuple[str, str, str]:
    """Path parts of a file in a model's folder."""
    return (MODELS_DIR, model_id, name)


def _ckpt(model_id: str, step: int, attempt: str | None, ext: str) -> tuple[str, str, str]:
    if attempt is not None and not _ATTEMPT.fullmatch(attempt):
        raise ValueError(f"attempt id {attempt!r}: letters and digits only")
    return model_file(model_id, f"ckpt-{step:05d}.{ext}" if attempt is None else f"ckpt-{step:05d}.{attempt}.{ext}")


def checkpoint_name(model_id: str, step: int, attempt: str | None = None) -> tuple[str, str, str]:
    """Path parts of model ``model_id``'s whole-model checkpoint after ``step`` train units.

    With ``attempt``: the file one dispatch of the unit writes. Only the attempt the driver accepts
    is renamed to the plain name, so a stale worker (one the driver already gave up on) can never
    overwrite the model's checkpoint.
    """
    return _ckpt(model_id, step, attempt, "keras")


def state_name(model_id: str, step: int, attempt: str | None = None) -> tuple[str, str, str]:
    """Path parts of model ``model_id``'s weights and optimizer state after ``step`` train units
    (``attempt`` as for :func:`checkpoint_name`)."""
    return _ckpt(model_id, step, attempt, "state")


_ATTEMPT = re.compile(r"[A-Za-z0-9]+")
_CHECKPOINT = re.compile(r"ckpt-(\d{5,})(?:\.([A-Za-z0-9]+))?\.(?:keras|state)")


def parse_checkpoint(name: str) -> tuple[int, str | None] | None:
    """(step, attempt or None) of a checkpoint or state file name; None for any other file."""
    found = _CHECKPOINT.fullmatch(name)
    return (int(found.group(1)), found.group(2)) if found else None


# A file being written: ``.tmp-<token>-<its final name>`` beside it, renamed once complete (the
# store's writes and mop/checkpoint.py's); a writer that died leaves it behind.
PARTIAL = re.compile(r"\.tmp-[A-Za-z0-9_]+-(.+)")


def partial_of(name: str) -> str | None:
    """The final name a partial write (``.tmp-<token>-<name>``) was for; None for any other file."""
    found = PARTIAL.fullmatch(name)
    return found.group(1) if found else None


def error_name(model_id: str) -> tuple[str, str]:
    """Path parts of the file holding the tracebacks of ``model_id``'s failed units."""
    return (ERRORS_DIR, f"{model_id}.txt")
