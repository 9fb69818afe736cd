"""Cerebro's public API on this engine: ``SparkBackend``, ``SparkEstimator``, ``LocalStore`` /
``HDFSStore``, ``GridSearch`` / ``RandomSearch`` / ``TPESearch`` and their result.

Scripts import these names from :mod:`cerebro_tasks` itself (lazily, without TensorFlow or Spark).
"""
