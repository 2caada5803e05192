"""Rows of a figures table (bench/events_throughput.py): a measured value, its target and
its same-run reference, as ratios that read the same way whatever the unit (> 1: better than
the target, faster than the reference)."""

from __future__ import annotations

from typing import Any

#: unit -> (scale, format, lower is better)
UNITS: dict[str, tuple[float, str, bool]] = {
    "events/s": (1e-3, "{:,.1f} k", False), "blocks/s": (1e-6, "{:.3f} M", False),
    "s": (1e6, "{:,.1f} us", True)}


def row(name: str, unit: str, value: float, *, target: float | None = None,
        reference: float | None = None, reference_name: str | None = None,
        **extra: Any) -> dict[str, Any]:
    low = UNITS[unit][2]
    r: dict[str, Any] = {"name": name, "unit": unit, "value": value, "target": target,
                         "vs_target": None, "reference": reference,
                         "reference_name": reference_name, "ratio": None, **extra}
    if target and value:
        r["vs_target"] = target / value if low else value / target
    if reference and value:
        r["ratio"] = reference / value if low else value / reference
    return r


def format_rows(rows: list[dict[str, Any]]) -> str:
    """One table; each number carries its unit."""
    def num(v: float | None, unit: str) -> str:
        if not v:
            return "-"
        scale, fmt, _ = UNITS[unit]
        return fmt.format(v * scale) + ("" if unit == "s" else " " + unit)

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    head = (f"{'figure':62}  {'measured':>20}  {'target':>18}  {'vs target x':>11}  "
            f"{'reference':>20}  {'ratio x':>7}  reference measured as")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['name'][:62]:62}  {num(r['value'], r['unit']):>20}  "
                   f"{num(r['target'], r['unit']):>18}  {x(r['vs_target']):>11}  "
                   f"{num(r['reference'], r['unit']):>20}  {x(r['ratio']):>7}  "
                   f"{r['reference_name'] or '-'}")
    return "\n".join(out)
