"""Memory of the tiers kvbm copies between: shared-memory host pools, engine-owned KV views, copy movers."""
