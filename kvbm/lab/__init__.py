"""Research and demo tooling: synthetic traces (``workload``), replay through the manager
(``replay``) and its policy-level model (``simulate``), bandwidth measurements
(``bandwidth``), and ``kvbm demo`` (``demo``).

Never imported by the runtime: what an engine imports (``kvbm``, ``kvbm.manager``, the tiers)
must not pull any of this in (tests/test_layering.py checks it). ``bench/``, the tests and the
``kvbm demo`` command use it.
"""
