"""Eviction and admission policies, selected by name (``HostTierConfig.eviction`` ...).

Eviction: ``lru``, ``lineage`` (leaf-first LRU), ``lfu`` (decaying counts), ``arc``,
``s3fifo``, ``adaptive`` (leaf-first LRU or probation-first, by a sampled duel) and
``predictive`` (the default: leaf-first eviction by expected reuse per structural class,
or ``adaptive``'s orders when they win the duel). Admission: ``frequency`` (admit on the
second sighting), or ``None`` to admit everything. Measurements behind the default are in
docs/policies.md.
"""

from __future__ import annotations

from typing import Any

from kvbm.errors import PolicyError
from kvbm.policies.adaptive import AdaptivePolicy
from kvbm.policies.admission import FrequencyAdmission
from kvbm.policies.arc import ARCPolicy
from kvbm.policies.base import AdmissionPolicy, EvictionPolicy
from kvbm.policies.lfu import LFUPolicy
from kvbm.policies.lineage import LineagePolicy
from kvbm.policies.lru import LRUPolicy
from kvbm.policies.predictive import PredictivePolicy
from kvbm.policies.s3fifo import S3FIFOPolicy

EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (LRUPolicy, LineagePolicy, LFUPolicy, ARCPolicy, S3FIFOPolicy,
                              AdaptivePolicy, PredictivePolicy)
}
ADMISSION_POLICIES: dict[str, type[AdmissionPolicy]] = {
    cls.name: cls for cls in (FrequencyAdmission,)
}

__all__ = [
    "ADMISSION_POLICIES",
    "EVICTION_POLICIES",
    "ARCPolicy",
    "AdaptivePolicy",
    "AdmissionPolicy",
    "EvictionPolicy",
    "FrequencyAdmission",
    "LFUPolicy",
    "LRUPolicy",
    "LineagePolicy",
    "PredictivePolicy",
    "S3FIFOPolicy",
    "make_admission",
    "make_eviction",
]


def _lookup(kind: str, table: dict[str, Any], name: object) -> Any:
    cls = table.get(name.strip().lower()) if isinstance(name, str) else None
    if cls is None:
        raise PolicyError(f"unknown {kind} policy {name!r}; valid names: "
                          f"{', '.join(sorted(table))}")
    return cls


def make_eviction(name: str, capacity: int, **params: Any) -> EvictionPolicy:
    """A new eviction policy ``name`` for a tier of ``capacity`` blocks.

    ``params`` are the policy's keyword options (``half_life`` for ``lfu``,
    ``small_fraction`` / ``move_threshold`` for ``s3fifo``, ``sample`` / ``horizon`` /
    ``reach`` / ``memory`` / ``margin`` for ``predictive``). Raises
    :class:`~kvbm.errors.PolicyError` for an unknown name or a bad option.
    """
    cls = _lookup("eviction", EVICTION_POLICIES, name)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise PolicyError(f"capacity must be an int >= 0, got {capacity!r}")
    try:
        policy: EvictionPolicy = cls(capacity, **params)
    except PolicyError:
        raise
    # TypeError: an unknown option; ValueError / OverflowError: an option its checks let
    # through but its arithmetic cannot take (a sketch too wide, a horizon too far)
    except (TypeError, ValueError, OverflowError) as e:
        raise PolicyError(f"bad options for eviction policy {name!r}: {e}") from None
    return policy


def make_admission(name: str | None, **params: Any) -> AdmissionPolicy | None:
    """A new admission policy ``name``, or ``None`` (admit everything) for ``None``/``"none"``.

    ``params`` are its keyword options (``threshold``, ``width``, ``depth``, ``window`` for
    ``frequency``). Raises :class:`~kvbm.errors.PolicyError` for an unknown name.
    """
    if name is None or (isinstance(name, str) and name.strip().lower() in ("", "none")):
        if params:
            raise PolicyError(f"admission None takes no options, got {sorted(params)}")
        return None
    cls = _lookup("admission", ADMISSION_POLICIES, name)
    try:
        policy: AdmissionPolicy = cls(**params)
    except PolicyError:
        raise
    # TypeError: an unknown option; ValueError / OverflowError: an option its checks let
    # through but its arithmetic cannot take (a sketch too wide, a horizon too far)
    except (TypeError, ValueError, OverflowError) as e:
        raise PolicyError(f"bad options for admission policy {name!r}: {e}") from None
    return policy
