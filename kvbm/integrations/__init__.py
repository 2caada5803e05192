"""Integrations of kvbm into inference engines (vLLM first: :mod:`kvbm.integrations.vllm`)."""
