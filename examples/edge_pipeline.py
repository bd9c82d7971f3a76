"""An edge relay's pipeline for device temperatures (`sockstack edge --pipeline
examples/edge_pipeline.py:build`): a reading's value is {"temp": 21.5, ...} or a plain number.
Each device's readings become one summary per 10 seconds."""

from __future__ import annotations

from sockstack.edge.pipeline import Dedupe, Pipeline, TumblingWindow, Validate
from sockstack.edge.records import Reading


def temperature(r: Reading) -> bool | str:
    """True for a plausible temperature, else the reason the reading is dropped."""
    t = r.value.get("temp") if isinstance(r.value, dict) else r.value
    if not isinstance(t, int | float) or isinstance(t, bool):
        return "not a number"
    if not -60.0 <= t <= 150.0:  # NaN fails this too
        return "out of range"
    return True


def build() -> Pipeline:
    return Pipeline(
        Validate(temperature),
        Dedupe(horizon=60.0),  # a device's retransmissions: (device, seq) seen in the last minute
        TumblingWindow(
            10.0,  # per device (the reading's stream), by the readings' own time
            field="temp",
            aggregates=("count", "mean", "min", "max", "p95"),
            lateness=2.0,  # a reading up to 2 s late still counts in its window
        ),
    )
