"""The one print format for measurements.
"""

from __future__ import annotations


def report(label: str, **values) -> None:
    """The one print format for measurements: ``label | key: value | ...`` with units in the keys."""
    parts = []
    for key, value in values.items():
        if isinstance(value, float):
            value = f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        parts.append(f"{key}: {value}")
    print(f"{label:<28} | " + " | ".join(parts))
