"""kvbm as vLLM's tiered KV cache: the ``KvbmConnector`` KV connector.

Load it with::

    KVTransferConfig(kv_connector="KvbmConnector",
                     kv_connector_module_path="kvbm.integrations.vllm",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"kvbm": {"host": {"num_blocks": 4096},
                                                         "disk": {"path": "/nvme/kvbm"}}})

See docs/vllm.md. Importing this module imports vLLM (``pip install 'kvtier[vllm]'``).
"""

from kvbm.deps import require

require("vllm", "vllm", "the vLLM connector")

from kvbm.integrations.vllm.connector import KvbmConnector, KvbmMetadata, KvbmWorkerMetadata  # noqa: E402

__all__ = ["KvbmConnector", "KvbmMetadata", "KvbmWorkerMetadata"]
