"""Cerebro's estimator: ``SparkEstimator`` (a Keras model and how to train it) and its MOP workload.

``from cerebro_tasks.estimator import SparkEstimator`` stands for Cerebro's
``from cerebro.keras import SparkEstimator``. Importing this package loads neither TensorFlow nor
Spark; the workload is imported on demand (it needs the MOP engine).
"""

from __future__ import annotations

from cerebro_tasks.estimator.estimator import SparkEstimator

__all__ = ["SparkEstimator"]
