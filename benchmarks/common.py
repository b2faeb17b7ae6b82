"""Shared helpers of the benchmarks: machine description, timing with warm-up and medians."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "python": sys.version.split()[0], "jax": jax.__version__,
            "backend": jax.default_backend(), "device": str(jax.devices()[0]),
            "date": time.strftime("%Y-%m-%d")}


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """Write a profile's ``result`` as JSON to ``path`` (folders made as needed), with the machine and its load
    average now under ``result["machine"]`` (kept where the caller already set them), and say where."""
    result["machine"] = {**machine(), "load_average": [round(v, 2) for v in os.getloadavg()],
                         **result.get("machine", {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


def time_calls(fn: Callable[[], Any], *, calls: int, repeats: int = 5) -> list[float]:
    """Seconds per call of ``fn`` (which must block until its result is ready), ``repeats`` times."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - start) / calls)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)
