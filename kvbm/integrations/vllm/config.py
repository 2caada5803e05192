"""kvbm's configuration inside vLLM: from ``kv_connector_extra_config`` and vLLM's own config.

``kv_connector_extra_config["kvbm"]`` is a mapping with the sections and keys of kvbm's TOML
config (``host``, ``disk``, ``s3``, ``gcs``, ``offload``, ``salt``, ...);
``kv_connector_extra_config["kvbm_config_file"]`` names a TOML file instead. ``KVBM_*``
variables override both, as everywhere. ``device`` does not apply: G1 is vLLM's.
The page layout (layers, KV heads, head size, block size, dtype) is vLLM's model's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbm.config import HostTierConfig, ManagerConfig, env_overrides
from kvbm.errors import ConfigError
from kvbm.layout import KVKind, KVLayout, normalize_dtype

#: Keys of ``kv_connector_extra_config`` that kvbm reads.
EXTRA_KEYS = ("kvbm", "kvbm_config_file", "kvbm_model_id", "kvbm_metrics_port",
              "kvbm_metrics_host", "kvbm_disagg")

#: G2 pages when the configuration names no host tier.
DEFAULT_HOST_BLOCKS = 1024


@dataclass(frozen=True)
class ConnectorSettings:
    """What the connector needs: the page layout, kvbm's config, vLLM's parallelism."""

    layout: KVLayout
    config: ManagerConfig
    #: tensor-parallel ranks (each holds a slice of the KV heads; MLA: the whole latent)
    world_size: int
    #: vLLM's engine id (names the shared-memory pool)
    engine_id: str


def _read_toml(path: Any) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    if not isinstance(path, str | os.PathLike):
        raise ConfigError(f"kvbm_config_file must be a path, got {path!r}")
    try:
        data: dict[str, Any] = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot read kvbm_config_file {path!r}: {e}") from None
    return data


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def manager_config(extra: Mapping[str, Any], env: Mapping[str, str] | None = None
                   ) -> ManagerConfig:
    """kvbm's config from vLLM's ``kv_connector_extra_config`` (and ``KVBM_*`` variables)."""
    if not isinstance(extra, Mapping):
        raise ConfigError(f"kv_connector_extra_config must be a mapping, got {extra!r}")
    inline, path = extra.get("kvbm"), extra.get("kvbm_config_file")
    if inline is not None and path is not None:
        raise ConfigError("give kvbm's config either inline (kv_connector_extra_config"
                          "['kvbm']) or as a file (['kvbm_config_file']), not both")
    if path is not None:
        data = _read_toml(path)
    elif inline is not None:
        if not isinstance(inline, Mapping):
            raise ConfigError(f"kv_connector_extra_config['kvbm'] must be a mapping of "
                              f"config sections, got {type(inline).__name__}")
        data = dict(inline)
    else:
        data = {}
    if data.get("device") is not None:
        raise ConfigError("kvbm's [device] section does not apply inside vLLM: G1 is vLLM's "
                          "KV cache (size it with vLLM's own options)")
    env = os.environ if env is None else env
    data = _merge(data, env_overrides(ManagerConfig, env))
    if data.get("device") is not None:
        raise ConfigError("KVBM_DEVICE_* variables do not apply inside vLLM: G1 is vLLM's KV "
                          "cache (size it with vLLM's own options); unset them")
    data["device"] = None
    data.setdefault("host", {"num_blocks": DEFAULT_HOST_BLOCKS})
    if data["host"] is None:
        raise ConfigError("the vLLM connector keeps pages in host memory (G2): the host "
                          "section cannot be dropped")
    config = ManagerConfig.from_mapping(data)
    if config.events.enabled:
        raise ConfigError("kvbm's [events] publisher does not apply inside vLLM: kvbm's "
                          "tier events travel on vLLM's own publisher (enable vLLM's "
                          "kv_events_config; docs/vllm.md)")
    assert isinstance(config.host, HostTierConfig)
    return config


def layout_from_vllm(vllm_config: Any, model_id: str | None = None) -> KVLayout:
    """The page layout of vLLM's model: every layer, every KV head (all TP ranks)."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    if pc.pipeline_parallel_size != 1:
        raise ConfigError("kvbm's vLLM connector supports pipeline_parallel_size 1 "
                          f"(got {pc.pipeline_parallel_size})")
    dtype = cc.cache_dtype
    if dtype in (None, "auto"):
        dtype = mc.dtype
    try:
        dtype = normalize_dtype(dtype)
    except Exception as e:
        raise ConfigError(f"kvbm cannot store KV of dtype {cc.cache_dtype!r}: {e}") from None
    mla = bool(getattr(mc, "use_mla", False))
    layers = mc.get_num_layers(pc)
    name = model_id if model_id is not None else str(mc.model)
    if mla:
        return KVLayout(layers, 1, mc.get_head_size(), cc.block_size, dtype, model_id=name,
                        kind=KVKind.MLA)
    return KVLayout(layers, mc.get_total_num_kv_heads(), mc.get_head_size(), cc.block_size,
                    dtype, model_id=name)


def settings_from_vllm(vllm_config: Any, env: Mapping[str, str] | None = None
                       ) -> ConnectorSettings:
    kv = vllm_config.kv_transfer_config
    extra = dict(kv.kv_connector_extra_config or {})
    model_id = extra.get("kvbm_model_id")
    if model_id is not None and not isinstance(model_id, str):
        raise ConfigError(f"kvbm_model_id must be a string, got {model_id!r}")
    return ConnectorSettings(layout_from_vllm(vllm_config, model_id),
                             manager_config(extra, env),
                             int(vllm_config.parallel_config.tensor_parallel_size),
                             str(kv.engine_id))
