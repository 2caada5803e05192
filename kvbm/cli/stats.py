"""``kvbm stats``: describe a disk-tier directory, or read a running process's metrics.

``kvbm stats PATH`` reads a G3 directory without opening it for writing (format version,
layout fingerprint, pages, bytes, slabs). ``kvbm stats --url URL`` scrapes a metrics
endpoint (:func:`kvbm.metrics.start_metrics_server`) and prints one row per tier. Both take
``--json``. Neither needs torch.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from kvbm.errors import InvalidArgumentError, MetricsError, MissingDependencyError

#: Wire names in table order (G1 first); a medium kvbm does not know goes last.
_ORDER = ("GPU", "CPU_PINNED", "DISK", "OBJECT")
_BREAKER = {0: "closed", 1: "half-open", 2: "open"}
#: A metrics page is a few kB; anything this big is not one.
_MAX_BYTES = 16 << 20


# -- fetching --------------------------------------------------------------------------------
class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s): urllib would follow one to ftp:// too."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> Any:
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise MetricsError(f"{req.full_url} redirects to {newurl}: not http(s)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, timeout: float) -> str:
    """The body of ``url`` (an http(s) metrics endpoint), as text."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidArgumentError(f"--url must be an http:// or https:// URL, got {url!r}")
    # Straight to the endpoint, as Prometheus scrapes: no proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         _SameSchemeRedirects())
    try:
        with opener.open(url, timeout=timeout) as r:
            body: bytes = r.read(_MAX_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise MetricsError(f"{url} answered HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise MetricsError(f"cannot reach {url}: {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:
        raise MetricsError(f"cannot read {url}: {e!r}") from None
    if len(body) > _MAX_BYTES:
        raise MetricsError(f"{url} sent more than {_MAX_BYTES >> 20} MiB: not a metrics page")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise MetricsError(f"{url} did not send UTF-8 text") from None


# -- reading the exposition --------------------------------------------------------------------
Sample = tuple[str, dict[str, str], float]


def parse(text: str, source: str = "the endpoint") -> list[Sample]:
    """Every sample of a Prometheus text exposition."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError as e:
        raise MissingDependencyError("kvbm stats --url needs prometheus-client: "
                                     "pip install 'kvtier[metrics]'") from e
    try:
        samples = [(s.name, dict(s.labels), float(s.value))
                   for fam in text_string_to_metric_families(text) for s in fam.samples]
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise MetricsError(f"{source} did not answer Prometheus text ({e})") from None
    if not any(name.startswith("kvbm_") for name, _, _ in samples):
        raise MetricsError(f"{source} has no kvbm metrics")
    return samples


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Estimate a quantile from cumulative histogram buckets ``(upper bound, count)``, the
    last one +Inf, interpolating linearly inside a bucket (as PromQL's histogram_quantile
    does). ``None`` without observations; the highest finite bound when the quantile falls
    in the +Inf bucket."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lo, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lo
            if count == below:
                return bound
            return lo + (bound - lo) * (rank - below) / (count - below)
        lo, below = bound, count
    return lo


def _count(v: float) -> float | int:
    """A whole-numbered value as an int: Prometheus carries every count as a float, and a
    count that prints as ``3.0`` reads like a measurement."""
    return int(v) if math.isfinite(v) and float(v).is_integer() else v


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Totals and one dict per tier (keyed by wire name) from kvbm's samples."""
    total: dict[str, float | int] = {}
    tiers: dict[str, dict[str, Any]] = {}
    lat: dict[tuple[str, str], list[tuple[float, float]]] = {}

    def tier(m: str) -> dict[str, Any]:
        return tiers.setdefault(m, {"display": m, "hit_blocks": 0, "used_pages": None,
                                    "pages_moved": 0, "bytes_moved": 0, "inflight_pages": None,
                                    "breaker": None, "degraded": False})

    per_tier = {"kvbm_hit_blocks_total": "hit_blocks", "kvbm_pages_moved_total": "pages_moved",
                "kvbm_bytes_moved_total": "bytes_moved", "kvbm_tier_used_pages": "used_pages",
                "kvbm_inflight_pages": "inflight_pages"}
    for name, labels, value in samples:
        m = labels.get("medium")
        if m is None:
            if name.startswith("kvbm_") and not labels:
                total[name.removesuffix("_total").removeprefix("kvbm_")] = _count(value)
        elif name in per_tier:
            row = tier(m)
            row[per_tier[name]] = _count((row[per_tier[name]] or 0) + value)
        elif name == "kvbm_tier_degraded":
            tier(m)["degraded"] = value > 0
        elif name == "kvbm_breaker_state":
            tier(m)["breaker"] = _BREAKER.get(int(value), str(value))
        elif name == "kvbm_tier_info":
            tier(m)["display"] = labels.get("display", m)
        elif name == "kvbm_transfer_latency_seconds_bucket":
            key = (m, labels.get("direction", ""))
            lat.setdefault(key, []).append((float(labels["le"]), value))
    for (m, direction), buckets in lat.items():
        row = tier(m)
        for q in (0.5, 0.99):
            row[f"{direction}_p{round(q * 100)}_s"] = quantile(buckets, q)
    ordered = sorted(tiers, key=lambda m: (_ORDER.index(m) if m in _ORDER else len(_ORDER), m))
    q = total.get("query_blocks", 0)
    hit = _count(sum(r["hit_blocks"] for r in tiers.values()))
    return {"lookups": total.get("lookups", 0), "query_blocks": q, "hit_blocks": hit,
            "hit_ratio": hit / q if q else 0.0, "totals": total,
            "tiers": {m: tiers[m] for m in ordered}}


# -- output ------------------------------------------------------------------------------------
def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _bytes(v: float | None) -> str:
    if v is None:
        return "-"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if v >= 1 << shift:
            return f"{v / (1 << shift):.1f} {unit}"
    return f"{v:.0f} B"


def _ms(row: dict[str, Any], direction: str) -> str:
    p50, p99 = row.get(f"{direction}_p50_s"), row.get(f"{direction}_p99_s")
    if p50 is None or p99 is None:
        return "-"
    return f"{p50 * 1e3:.1f}/{p99 * 1e3:.1f}"


def _health(row: dict[str, Any]) -> str:
    """The breaker column: "degraded" (the tier's location failed a check) says more than
    the breaker's state; --json has both."""
    return "degraded" if row["degraded"] else str(row["breaker"] or "-")


def table(doc: dict[str, Any], source: str) -> str:
    tiers = doc["tiers"]
    w = max([len("tier"), *(len(r["display"]) for r in tiers.values())])
    # Two spaces at least between columns: multi-word headers must not run together.
    head = (f"{'tier':<{w}}  {'hit blocks':>10}  {'used pages':>10}  {'pages moved':>11}  "
            f"{'bytes moved':>11}  {'in flight':>9}  {'breaker':>9}  {'load p50/p99 ms':>16}  "
            f"{'store p50/p99 ms':>16}")
    lines = [f"kvbm metrics at {source}: {doc['lookups']:.0f} lookups, "
             f"{doc['hit_blocks']:.0f} of {doc['query_blocks']:.0f} blocks hit "
             f"({doc['hit_ratio']:.1%})", head]
    for r in tiers.values():
        lines.append(f"{r['display']:<{w}}  {_num(r['hit_blocks']):>10}  "
                     f"{_num(r['used_pages']):>10}  {_num(r['pages_moved']):>11}  "
                     f"{_bytes(r['bytes_moved']):>11}  {_num(r['inflight_pages']):>9}  "
                     f"{_health(r):>9}  {_ms(r, 'load'):>16}  {_ms(r, 'store'):>16}")
    return "\n".join(lines)


#: Row labels of ``kvbm stats PATH``, in order; keys describe() adds later print after them.
_DISK_ROWS = {"path": "path", "format": "format", "format_version": "format version",
              "layout": "layout", "layout_fingerprint": "layout fingerprint",
              "page_bytes": "page bytes", "pages": "pages", "bytes": "payload bytes",
              "pages_from": "pages counted from", "damaged_headers": "damaged headers",
              "slabs": "slab files", "slab_file_bytes": "slab file bytes",
              "slot_bytes": "slot bytes", "slab_slots": "slots per slab", "index": "index",
              "index_problem": "index problem", "index_file_bytes": "index file bytes",
              "open_by_pid": "open by pid"}


def _disk_table(d: dict[str, Any]) -> str:
    keys = [k for k in _DISK_ROWS if k in d] + [k for k in d if k not in _DISK_ROWS]
    w = max(len(_DISK_ROWS.get(k, k)) for k in keys)
    return "\n".join(f"{_DISK_ROWS.get(k, k):<{w}}  {_value(k, d[k])}" for k in keys)


def _value(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items())
    if key.endswith("bytes") and isinstance(v, int) and v >= 1024:
        return f"{v} ({_bytes(v)})"
    return str(v)


def _run(args: argparse.Namespace) -> int:
    if (args.path is None) == (args.url is None):
        raise InvalidArgumentError("give a disk tier PATH or --url URL (one of them)")
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise InvalidArgumentError(f"--timeout must be a positive number, got {args.timeout}")
    if args.path is not None:
        from kvbm.storage.disk.inspect import describe

        doc = describe(args.path)
        print(json.dumps(doc, indent=2, default=str) if args.json else _disk_table(doc))
        return 0
    doc = summarize(parse(fetch(args.url, args.timeout), args.url))
    print(json.dumps({"url": args.url, **doc}, indent=2) if args.json
          else table(doc, args.url))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("stats", help="describe a disk tier directory, or a running process's "
                                     "metrics endpoint")
    p.add_argument("path", nargs="?", help="a disk tier directory (read, never written)")
    p.add_argument("--url", help="metrics endpoint, e.g. http://127.0.0.1:9400/metrics")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (--url; default 5)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    p.set_defaults(fn=_run)
