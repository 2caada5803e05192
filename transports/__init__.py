"""Transports between processes and machines (importable as ``kvbm.transports``)."""
