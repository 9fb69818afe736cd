"""Test harnesses: a real Spark standalone cluster on this machine (cluster.py)."""
