"""The CNN-BiLSTM builder and the BalancedAccuracy metric.

Big models are only built (compile=False) to count parameters; anything that runs uses
amp_factor 0.25 and a few short sequences so the whole file takes seconds on a shared CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cerebro_tasks.deeppostures.architecture import parameter_count  # noqa: E402
from cerebro_tasks.deeppostures.model import build_cnn_bilstm, window_size_for  # noqa: E402
from cerebro_tasks.deeppostures.metrics import BalancedAccuracy, balanced_accuracy  # noqa: E402

T = 4  # short sequences keep the runnable tests fast


def tiny(**kwargs) -> keras.Model:
    return build_cnn_bilstm(window_size=T, amp_factor=0.25, seed=7, **kwargs)


def batch(n: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, T, 100, 3)).astype(np.float32), rng.integers(0, 2, (n, T)).astype(np.int32)


# ---------------------------------------------------------------- window size


@pytest.mark.parametrize("minutes, windows", [(7, 42), (9, 54), (3, 18), (0.5, 3), (7.0, 42)])
def test_window_size_for(minutes: float, windows: int) -> None:
    assert window_size_for(minutes) == windows


@pytest.mark.parametrize("minutes", [0, -1, 7.05, 1 / 7])
def test_window_size_for_rejects_partial_windows(minutes: float) -> None:
    with pytest.raises(ValueError):
        window_size_for(minutes)


# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    "amp, exact, about",
    [(1, 1_725_378, 1.7), (2, 5_976_450, 6.0), (4, 22_453_506, 22.5)],
)
def test_parameter_counts_match_the_reference(amp: int, exact: int, about: float) -> None:
    model = build_cnn_bilstm(window_size=42, amp_factor=amp, compile=False)
    assert model.count_params() == exact
    assert round(model.count_params() / 1e6, 1) == about  # the reference's "about N M"
    # The count does not depend on T (weights are shared over windows and steps).
    assert build_cnn_bilstm(window_size=54, amp_factor=amp, compile=False).count_params() == exact
    assert parameter_count(amp) == exact  # the driver's Keras-free cost estimate agrees


@pytest.mark.parametrize("amp", [0.25, 0.5, 3])
def test_keras_free_parameter_count_matches_small_and_odd_widths(amp: float) -> None:
    assert parameter_count(amp) == build_cnn_bilstm(window_size=18, amp_factor=amp, compile=False).count_params()


def test_layers_as_in_the_reference() -> None:
    model = build_cnn_bilstm(window_size=42, amp_factor=1, compile=False)
    convs = [model.get_layer(f"conv{i}") for i in range(1, 6)]
    assert [c.filters for c in convs] == [32, 64, 128, 256, 256]
    # Conv3D one window deep: the reference's Conv2D kernels and strides on every window.
    assert [c.kernel_size for c in convs] == [(1, 5, 3), (1, 5, 1), (1, 5, 1), (1, 5, 1), (1, 5, 1)]
    assert all(c.strides == (1, 2, 1) and c.padding == "same" for c in convs)
    assert all(c.activation is keras.activations.relu for c in convs)
    emb = model.get_layer("window_embedding")
    assert emb.units == 256 and emb.activation is keras.activations.linear
    bilstm = model.get_layer("bilstm")
    assert bilstm.forward_layer.units == 128 and bilstm.backward_layer.units == 128
    assert model.input_shape == (None, 42, 100, 3)
    assert model.output_shape == (None, 42, 2)
    # No pooling, dropout or normalisation anywhere.
    kinds = {type(layer).__name__ for layer in model.layers}
    assert not {k for k in kinds if "Pool" in k or "Dropout" in k or "Normalization" in k}


def test_fractional_amp_factor_rounds_filters() -> None:
    model = build_cnn_bilstm(window_size=T, amp_factor=0.25, compile=False)
    assert [model.get_layer(f"conv{i}").filters for i in range(1, 6)] == [8, 16, 32, 64, 64]
    assert model.get_layer("window_embedding").units == 64


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        build_cnn_bilstm(window_size=T, num_classes=1, compile=False)
    with pytest.raises(ValueError):
        build_cnn_bilstm(window_size=0, compile=False)
    with pytest.raises(ValueError):
        build_cnn_bilstm(window_size=T, l2=-1.0, compile=False)


# ---------------------------------------------------------------- behaviour (tiny model)


def test_output_shape_and_seeding() -> None:
    X, _ = batch(3)
    a, b = tiny(compile=False), tiny(compile=False)
    out = np.asarray(a(X, training=False))
    assert out.shape == (3, T, 2)
    np.testing.assert_array_equal(out, np.asarray(b(X, training=False)))  # same seed, same model
    c = build_cnn_bilstm(window_size=T, amp_factor=0.25, seed=8, compile=False)
    assert not np.allclose(out, np.asarray(c(X, training=False)))
    # Forward and backward LSTMs do not start from identical weights.
    lstm = a.get_layer("bilstm")
    assert not np.allclose(lstm.forward_layer.get_weights()[0], lstm.backward_layer.get_weights()[0])


def test_l2_is_part_of_the_loss() -> None:
    X, y = batch(3)
    plain, reg = tiny(l2=0.0), tiny(l2=1e-3)
    reg.set_weights(plain.get_weights())
    assert isinstance(reg.get_layer("conv1").kernel_regularizer, keras.regularizers.L2)
    assert plain.get_layer("conv1").kernel_regularizer is None
    loss0 = plain.evaluate(X, y, verbose=0, return_dict=True)["loss"]
    loss1 = reg.evaluate(X, y, verbose=0, return_dict=True)["loss"]
    penalty = float(sum(np.asarray(v) for v in reg.losses))
    assert penalty > 0 and loss1 > loss0
    assert loss1 - loss0 == pytest.approx(penalty, rel=1e-3)
    # Every kernel is regularised: conv1-5, embedding, 2 LSTM kernels + 2 recurrent, output.
    assert len(reg.losses) == 5 + 1 + 4 + 1


def test_fit_then_save_load_round_trip(tmp_path) -> None:
    X, y = batch(4)
    model = tiny(l2=1e-4)
    w = np.ones_like(y, dtype=np.float32)
    history = model.fit(X, y, sample_weight=w, batch_size=2, epochs=1, verbose=0, validation_data=(X, y))
    assert set(history.history) == {
        "loss", "accuracy", "balanced_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy"
    }
    assert np.isfinite(history.history["loss"][0])

    path = tmp_path / "model.keras"
    model.save(path)  # weights, optimizer state, compile config, custom layers and metric
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(model.predict_on_batch(X), loaded.predict_on_batch(X))
    assert loaded.input_shape == (None, T, 100, 3)
    assert loaded.evaluate(X, y, verbose=0, return_dict=True)["loss"] == pytest.approx(
        model.evaluate(X, y, verbose=0, return_dict=True)["loss"], rel=1e-5
    )


# ---------------------------------------------------------------- balanced accuracy


def test_numpy_balanced_accuracy_by_hand() -> None:
    y = np.array([0, 0, 0, 1])
    assert balanced_accuracy(y, np.array([0, 0, 1, 1])) == pytest.approx((2 / 3 + 1) / 2)
    # Only classes present count; a masked step and a -1 label are ignored.
    assert balanced_accuracy(np.array([0, 0, -1]), np.array([0, 1, 1]), num_classes=2) == 0.5
    assert balanced_accuracy(y, np.array([1, 0, 0, 0]), np.array([0, 1, 1, 1])) == pytest.approx(0.5)
    assert np.isnan(balanced_accuracy(np.array([-1]), np.array([0]), num_classes=2))


def test_metric_matches_numpy_with_masks_over_batches() -> None:
    rng = np.random.default_rng(3)
    m = BalancedAccuracy()
    assert float(m.result()) == 0.0
    ys, ps, ws = [], [], []
    for _ in range(3):
        y = (rng.random((5, 6)) < 0.2).astype(np.int32)  # imbalanced like the real data
        y[0, :2] = -1  # unlabelled steps are ignored
        p = rng.random((5, 6, 2)).astype(np.float32)
        w = (rng.random((5, 6)) < 0.8).astype(np.float32)  # weight 0 = masked step
        m.update_state(y, p, sample_weight=w)
        ys.append(y), ps.append(p), ws.append(w)
    expected = balanced_accuracy(np.concatenate(ys), np.concatenate(ps), np.concatenate(ws), num_classes=2)
    assert float(m.result()) == pytest.approx(expected, abs=1e-6)
    # Class-constant weights do not change per-class recall.
    m2 = BalancedAccuracy()
    for y, p in zip(ys, ps):
        m2.update_state(y, p, sample_weight=np.where(y == 1, 4.0, 1.0))
    assert float(m2.result()) == pytest.approx(balanced_accuracy(np.concatenate(ys), np.concatenate(ps), num_classes=2))
    m.reset_state()
    assert float(m.result()) == 0.0


def test_metric_single_column_and_per_sequence_weights() -> None:
    y = np.array([[0, 1, 1], [0, 0, 1]])
    p = np.array([[0.2, 0.9, 0.4], [0.7, 0.1, 0.8]], dtype=np.float32)[..., None]
    m = BalancedAccuracy(threshold=0.5)
    m.update_state(y, p, sample_weight=np.array([1.0, 0.0]))  # second sequence masked
    assert float(m.result()) == pytest.approx(balanced_accuracy(y[:1], p[:1]))
    logits = BalancedAccuracy(threshold=0.0)
    logits.update_state(y, np.log(p / (1 - p)))
    assert float(logits.result()) == pytest.approx(balanced_accuracy(y, p))


def test_metric_config_round_trip() -> None:
    m = BalancedAccuracy(num_classes=3, threshold=0.3, name="ba")
    clone = BalancedAccuracy.from_config(m.get_config())
    assert (clone.num_classes, clone.threshold, clone.name) == (3, 0.3, "ba")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(m))
    assert isinstance(restored, BalancedAccuracy) and restored.num_classes == 3


# ---------------------------------------------------------------- the CNN is per window; portable files


def test_each_window_embedding_sees_only_its_own_window() -> None:
    model = tiny(compile=False)
    embed = keras.Model(model.input, model.get_layer("window_embedding").output)
    X, _ = batch(2)
    base = np.asarray(embed(X))
    assert base.shape == (2, T, 64)
    changed = X.copy()
    changed[:, 1] += 5.0  # only window 1 of each sequence
    after = np.asarray(embed(changed))
    np.testing.assert_allclose(np.delete(after, 1, axis=1), np.delete(base, 1, axis=1), rtol=1e-5, atol=1e-6)
    assert not np.allclose(after[:, 1], base[:, 1])
    # ... and is what the same convolutions give a sequence of one window
    single = build_cnn_bilstm(window_size=1, amp_factor=0.25, seed=7, compile=False)
    single.set_weights(model.get_weights())
    one = keras.Model(single.input, single.get_layer("window_embedding").output)
    np.testing.assert_allclose(np.asarray(one(X[:, 2:3]))[:, 0], base[:, 2], rtol=1e-4, atol=1e-5)


def test_a_saved_model_loads_with_plain_keras_in_a_fresh_python(tmp_path) -> None:
    """What an export writes (uncompiled) loads where this package cannot even be imported."""
    import subprocess
    import sys

    model = tiny(compile=False)
    X, _ = batch(2)
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", X)
    code = (
        "import sys\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'cerebro_tasks':\n"
        "            raise ImportError('cerebro_tasks must not be needed')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import numpy as np, keras\n"
        f"m = keras.saving.load_model({str(tmp_path / 'model.keras')!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, m.predict_on_batch(np.load({str(tmp_path / 'x.npy')!r})))\n"
        "assert not [k for k in sys.modules if k.startswith('cerebro_tasks')]\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model.predict_on_batch(X), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- more than two classes


def test_three_classes_output_count_and_metric() -> None:
    model = build_cnn_bilstm(window_size=T, amp_factor=0.25, seed=7, num_classes=3)
    assert model.output_shape == (None, T, 3)
    assert model.count_params() == parameter_count(0.25, num_classes=3)
    rng = np.random.default_rng(4)
    X = rng.normal(size=(4, T, 100, 3)).astype(np.float32)
    y = rng.integers(-1, 3, (4, T)).astype(np.int32)
    w = (y >= 0).astype(np.float32)
    history = model.fit(X, np.maximum(y, 0), sample_weight=w, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    # the metric over two batches equals numpy's over the whole: per-class counts add up
    m = BalancedAccuracy(num_classes=3)
    scores = np.asarray(model.predict_on_batch(X))
    for half in (slice(0, 2), slice(2, 4)):
        m.update_state(y[half], scores[half])
    assert float(m.result()) == pytest.approx(balanced_accuracy(y, scores, num_classes=3), abs=1e-6)
