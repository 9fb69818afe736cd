"""TensorBoard logs of a search, read back the way TensorBoard reads them (no TensorFlow needed)."""

from __future__ import annotations

import math
import os

import pytest
from tensorboard.backend.event_processing import event_accumulator, plugin_event_multiplexer
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util

from cerebro_tasks.search.tensorboard import write_tensorboard

HISTORY = {"train_loss": [0.9, 0.6, 0.4], "val_loss": [1.0, 0.7, 0.5], "val_acc": [0.5, 0.7, float("nan")]}


def read_run(folder: str) -> tuple[dict[str, list[tuple[int, float]]], dict[str, object]]:
    """Scalars (tag -> [(step, value)]) and the hparams of one run folder."""
    acc = event_accumulator.EventAccumulator(folder, size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    scalars = {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
               for tag in acc.Tags()["tensors"] if not tag.startswith("_hparams_")}
    content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.SESSION_START_INFO_TAG]
    start = hparams_metadata.parse_session_start_info_plugin_data(content)
    hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return scalars, {"hparams": hparams, "group_name": start.group_name}


def test_hparams_and_per_epoch_scalars_read_back(tmp_path):
    run = tmp_path / "runs" / "grid_1"
    url = write_tensorboard(str(run), "model_000", {"lr": 0.01, "batch_size": 32, "opt": "adam", "fn": (1, 2)},
                            HISTORY, "val_loss")
    folder = run / "tb" / "model_000"
    assert url.endswith("/tb/model_000") and folder.is_dir()
    assert any(n.startswith("events.out.tfevents.") for n in os.listdir(folder))
    scalars, info = read_run(str(folder))
    assert scalars["train_loss"] == [(1, pytest.approx(0.9)), (2, pytest.approx(0.6)), (3, pytest.approx(0.4))]
    assert [s for s, _ in scalars["val_acc"]] == [1, 2]  # the NaN epoch is left out
    assert scalars["selection/val_loss"] == [(3, pytest.approx(0.5))]
    assert info["hparams"] == {"lr": pytest.approx(0.01), "batch_size": 32.0, "opt": "adam", "fn": "(1, 2)"}


def test_rewrite_replaces_instead_of_duplicating(tmp_path):
    run = str(tmp_path / "run")
    write_tensorboard(run, "m", {"lr": 0.1}, {"val_loss": [1.0]})
    write_tensorboard(run, "m", {"lr": 0.1}, {"val_loss": [1.0, 0.5]})  # e.g. a resumed run
    scalars, _ = read_run(os.path.join(run, "tb", "m"))
    assert scalars["val_loss"] == [(1, 1.0), (2, 0.5)]
    assert len(os.listdir(os.path.join(run, "tb", "m"))) == 1


def test_logdir_runs_lists_every_model_of_every_search(tmp_path):
    runs = tmp_path / "runs"
    for search in ("grid_a", "tpe_b"):
        for model in ("model_000", "model_001"):
            write_tensorboard("file://" + str(runs / search), model, {"lr": 0.1}, {"val_loss": [0.3, 0.2]}, "val_loss")
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(runs))  # what `tensorboard --logdir <prefix>/runs` does
    mux.Reload()
    assert sorted(mux.Runs()) == [f"{s}/tb/{m}" for s in ("grid_a", "tpe_b") for m in ("model_000", "model_001")]
    events = mux.Tensors("tpe_b/tb/model_001", "val_loss")
    assert [round(float(tensor_util.make_ndarray(e.tensor_proto)), 6) for e in events] == [0.3, 0.2]


def test_missing_selection_metric_warns(tmp_path, caplog):
    write_tensorboard(str(tmp_path), "m", {}, {"train_loss": [1.0]}, "val_loss")
    assert "no value for the selection metric" in caplog.text
    with pytest.raises(ValueError, match="model_id"):
        write_tensorboard(str(tmp_path), "a/b", {}, {})
    assert math.isnan(HISTORY["val_acc"][-1])  # the fixture was not modified


def test_notes_are_text_at_their_epoch(tmp_path):
    """Where and why early stopping stopped a model: TensorBoard's Text tab."""
    from tensorboard.plugins.text import metadata as text_metadata

    write_tensorboard(str(tmp_path), "m", {"lr": 0.1}, {"val_loss": [1.0, 0.9]}, "val_loss",
                      notes={"early_stopping": (2, "stopped after epoch 2: ASHA rung 2")})
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb" / "m"), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    assert "early_stopping" in acc.PluginTagToContent(text_metadata.PLUGIN_NAME)
    [event] = acc.Tensors("early_stopping")
    assert event.step == 2 and tensor_util.make_ndarray(event.tensor_proto).item().decode() == \
        "stopped after epoch 2: ASHA rung 2"
