"""Write a benchmark's report: ``<out>.json`` and its plot ``<out>.png``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_report(report: dict, out: str | Path, plot: Callable[[dict, Path], None]) -> Path:
    """Write ``report`` as JSON next to its plot; returns the JSON path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return out.with_suffix(".json")
