"""DeepPostures' CNN-BiLSTM (shared/reference/deeppostures.md, "Model: CNN-BiLSTM"), Keras 3.

Input ``(T, 100, 3)``: a sequence of T 10-second windows of 10 Hz X/Y/Z acceleration. Every window
goes through the same CNN (five strided Conv2D, flatten, a linear Dense(256·a) embedding); the T
embeddings go through a bidirectional LSTM (128 per direction, one output per step); a Dense per
step gives ``num_classes`` logits. No pooling, dropout or batch norm, as in the reference.

Decisions (and why):

* **Output: C-class logits (C = ``num_classes``, 2 by default) + ``SparseCategoricalCrossentropy(from_logits=True)``.** This is the
  original TensorFlow DeepPostures model (MSSE-2021 ``cnn_bi_lstm_model``: ``dense(units=
  num_classes)`` + ``softmax_cross_entropy_with_logits``). Its parameter counts are the
  reference's: a=1 1,725,378; a=2 5,976,450; a=4 22,453,506 (about 1.7 M / 6.0 M / 22.5 M). A
  single sigmoid logit gives 257 fewer parameters, indistinguishable at that rounding, so the
  counts do not decide it; the 2-class head does because the argmax is unambiguous (logits and
  probabilities give the same class), and it avoids the Cerebro example's defect of feeding logits
  to a probability loss. ``num_classes=1`` is refused for that reason.
* **Per-window CNN as Conv3D with a kernel one window deep**, ``(1, kh, kw)`` and strides
  ``(1, 2, 1)``: exactly the reference's Conv2D applied to every window (same weights per window,
  same parameter count, no padding across windows), in one op over the whole sequence; the
  embedding is a Dense on ``(T, features)``, which Keras applies per step. Only Keras' own layers,
  so an exported ``model.keras`` loads with plain Keras in a Python that never imported this
  package. Not ``TimeDistributed``: Keras 3 unrolls it into T copies of the CNN in the graph
  (42-54 for the tuned window lengths). Training and prediction time on CPU measured the same
  as folding time into the batch with custom layers (which needed this package to load).
* **L2 is a real ``kernel_regularizer`` set at construction** on every weight layer (the five
  convolutions, the embedding, both LSTM kernels and recurrent kernels, the output layer), so it
  enters ``model.losses`` and the training loss. Biases are not regularised (usual practice).
  ``l2=0`` adds no regulariser at all. (The Cerebro example attached L2 after build: no effect.)
* **Seeded initialisers per layer** (``seed + k``) instead of a global ``set_random_seed``: the
  builder must not change the process's random state, which other models on the same worker use.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from cerebro_tasks.deeppostures.sequences import WINDOW_SECONDS, window_size_for
from cerebro_tasks.deeppostures.architecture import (
    AXES,
    CONV_SPECS,
    CONV_STRIDES,
    EMBEDDING_UNITS,
    LSTM_UNITS,
    SAMPLES_PER_WINDOW,
    scaled,
)
from cerebro_tasks.deeppostures.metrics import BalancedAccuracy

__all__ = [
    "build_cnn_bilstm",
    "window_size_for",
    "WINDOW_SECONDS",
    "SAMPLES_PER_WINDOW",
    "AXES",
    "CUSTOM_OBJECTS",
]

# What keras.saving.load_model needs for a compiled checkpoint (its metric); the layers are all
# Keras' own, so an uncompiled model (an export) needs nothing.
CUSTOM_OBJECTS: dict[str, Any] = {
    "BalancedAccuracy": BalancedAccuracy,
}


def build_cnn_bilstm(
    *,
    window_size: int,
    amp_factor: float = 1,
    l2: float = 0.0,
    learning_rate: float = 1e-4,
    num_classes: int = 2,
    seed: int | None = None,
    compile: bool = True,
) -> keras.Model:
    """Build (and by default compile) the DeepPostures CNN-BiLSTM.

    Args:
        window_size: T, windows per sequence (see :func:`window_size_for`).
        amp_factor: a, width multiplier of the CNN and the embedding (filters 32a..256a,
            embedding 256a, each rounded to an int).
        l2: L2 factor of the kernel regularisers (``l2 * sum(w**2)`` per kernel); 0 = none.
        learning_rate: Adam learning rate (reference default 1e-4).
        num_classes: output logits per step, at least 2 (sitting / not-sitting).
        seed: seeds every initialiser (layer k gets ``seed + k``); ``None`` = unseeded.
        compile: compile with Adam, sparse categorical cross-entropy on logits, and the
            ``accuracy`` and ``balanced_accuracy`` metrics. ``False`` builds only (fast; for
            parameter counts or for a trainer that compiles itself).

    Returns:
        A functional model, input ``(B, T, 100, 3)`` float32 named ``windows``, output
        ``(B, T, num_classes)`` logits named ``logits``.
    """
    if int(window_size) < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size!r}")
    if num_classes < 2:
        raise ValueError("num_classes must be >= 2 (the model outputs one logit per class)")
    if amp_factor <= 0:
        raise ValueError(f"amp_factor must be > 0, got {amp_factor!r}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2!r}")
    window_size = int(window_size)

    counter = iter(range(10_000))

    def init(kind: str = "glorot") -> keras.initializers.Initializer:
        s = None if seed is None else int(seed) + next(counter)
        if kind == "orthogonal":
            return keras.initializers.Orthogonal(seed=s)
        return keras.initializers.GlorotUniform(seed=s)

    def reg() -> keras.regularizers.Regularizer | None:
        return keras.regularizers.L2(l2) if l2 > 0 else None

    inputs = keras.Input(shape=(window_size, SAMPLES_PER_WINDOW, AXES), name="windows")
    x = layers.Reshape((window_size, SAMPLES_PER_WINDOW, AXES, 1), name="window_images")(inputs)
    for i, (filters, kernel) in enumerate(CONV_SPECS, start=1):
        x = layers.Conv3D(  # one window deep: the reference's per-window Conv2D on every window
            scaled(filters, amp_factor),
            (1, *kernel),
            strides=(1, *CONV_STRIDES),
            padding="same",
            activation="relu",
            kernel_initializer=init(),
            kernel_regularizer=reg(),
            name=f"conv{i}",
        )(x)
    x = layers.Reshape((window_size, -1), name="flatten")(x)  # per window: (T, features)
    x = layers.Dense(
        scaled(EMBEDDING_UNITS, amp_factor),
        activation=None,  # linear: the window embedding, as in the reference
        kernel_initializer=init(),
        kernel_regularizer=reg(),
        name="window_embedding",
    )(x)
    x = layers.Bidirectional(
        layers.LSTM(
            LSTM_UNITS,
            return_sequences=True,
            kernel_initializer=init(),
            recurrent_initializer=init("orthogonal"),
            kernel_regularizer=reg(),
            recurrent_regularizer=reg(),
            name="lstm",
        ),
        backward_layer=layers.LSTM(
            LSTM_UNITS,
            return_sequences=True,
            go_backwards=True,
            kernel_initializer=init(),
            recurrent_initializer=init("orthogonal"),
            kernel_regularizer=reg(),
            recurrent_regularizer=reg(),
            name="lstm_backward",
        ),
        merge_mode="concat",
        name="bilstm",
    )(x)
    outputs = layers.Dense(
        num_classes,
        activation=None,  # logits; the loss applies the softmax (from_logits=True)
        kernel_initializer=init(),
        kernel_regularizer=reg(),
        name="logits",
    )(x)
    model = keras.Model(inputs, outputs, name="cnn_bilstm")

    if compile:
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            # Weighted: masks (weight 0) apply; class-constant weights leave recalls unchanged.
            weighted_metrics=[BalancedAccuracy(num_classes=num_classes, name="balanced_accuracy")],
        )
    return model
