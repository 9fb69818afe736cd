"""The search, independent of any workload: spaces (``hp_*``), the TPE proposer, model selection,
the summary and plots a search leaves, TensorBoard logs. Imports only the engine and storage."""
