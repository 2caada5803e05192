"""Memory kvbm copies between: shared-memory host pools, engine-owned KV views, movers."""
