"""The CNN-BiLSTM's shape, without Keras: what the builder builds and what it costs.

The Spark driver decides schedules but never imports TensorFlow (it would start a runtime and,
on a GPU machine, take GPU memory the workers need); it still wants to know how expensive each
configuration is. The builder (`cnn_bilstm.py`) and the cost estimate read the same constants.
"""

from __future__ import annotations

SAMPLES_PER_WINDOW = 100  # 10 Hz over a 10 s window
AXES = 3  # X, Y, Z
LSTM_UNITS = 128  # per direction (reference)
EMBEDDING_UNITS = 256  # the window embedding, times amp_factor
CONV_STRIDES = (2, 1)
# (filters before amp_factor, kernel) of the five per-window convolutions
CONV_SPECS: tuple[tuple[int, tuple[int, int]], ...] = (
    (32, (5, 3)),
    (64, (5, 1)),
    (128, (5, 1)),
    (256, (5, 1)),
    (256, (5, 1)),
)


def scaled(units: int, amp_factor: float) -> int:
    """``units * a`` rounded to an int (fractional a such as 0.25 gives small demo models)."""
    return max(1, int(round(units * amp_factor)))


def parameter_count(amp_factor: float, num_classes: int = 2) -> int:
    """Exactly ``build_cnn_bilstm(amp_factor=a).count_params()``, for any window length.

    Also the engine's cost estimate of a configuration: training time per window on CPU tracks it
    within about 1.5x over amp_factor 0.25-4 (0.61-0.93 s per million parameters for 2,880
    windows, measured here), far closer than treating every configuration alike (80x apart).
    """
    height, width, channels = SAMPLES_PER_WINDOW, AXES, 1
    total = 0
    for filters, (kh, kw) in CONV_SPECS:
        out = scaled(filters, amp_factor)
        total += (kh * kw * channels + 1) * out
        height = -(-height // CONV_STRIDES[0])  # "same" padding: ceil(h / stride)
        channels = out
    embedding = scaled(EMBEDDING_UNITS, amp_factor)
    total += (height * width * channels + 1) * embedding
    total += 2 * 4 * ((embedding + LSTM_UNITS) * LSTM_UNITS + LSTM_UNITS)  # two directions, four gates
    total += (2 * LSTM_UNITS + 1) * num_classes
    return total
