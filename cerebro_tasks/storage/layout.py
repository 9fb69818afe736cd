"""The run's on-disk layout: every file a search leaves in ``<store>/runs/<run_id>/``, named once.

::

    config.json           the run configuration and the data split it trained on (resume checks it)
    run.json              the models the MOP driver was given (resume restores them)
    run.lock              held by the one driver running the run (heartbeat)
    journal/              one record per finished unit
    models/<model_id>/    ckpt-<step>.state (weights + optimizer state after every train unit: what a
                          hop moves), ckpt-<step>.keras (the whole model, at every epoch's end); the
                          Cerebro API's init.keras, estimator.pkl, model_info.json
    tb/<model_id>/        TensorBoard events
    search_state.json     the stopping rule's state and every early-stopping decision (resume)
    history.json, timeline.json, summary.json, summary.md, learning_curves.png, timeline.png
    result.json           the small result the DAG passes on

Every writer and reader of these names imports them from here, so the layout has one owner.
"""

from __future__ import annotations

CONFIG = "config.json"
RUN = "run.json"
RUN_LOCK = "run.lock"
JOURNAL_DIR = "journal"
MODELS_DIR = "models"
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


def checkpoint_name(model_id: str, step: int) -> tuple[str, str, str]:
    """Path parts of model ``model_id``'s checkpoint after ``step`` train units (0 = initial weights)."""
    return model_file(model_id, f"ckpt-{step:05d}.keras")


def state_name(model_id: str, step: int) -> tuple[str, str, str]:
    """Path parts of model ``model_id``'s weights and optimizer state after ``step`` train units."""
    return model_file(model_id, f"ckpt-{step:05d}.state")
