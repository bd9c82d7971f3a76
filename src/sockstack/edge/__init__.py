"""Edge and fog relays (docs/EDGE.md): ingest from devices, pre-process in a pipeline, keep what
was accepted in a durable outbox and forward it upstream, exactly once at the sink.

- :class:`Relay` (a pattern: ``Server(patterns=[Relay("edge.db", pipeline, upstream=...)])``)
  and :class:`Sink` (the cloud side);
- :class:`Device`: a device's side, with the :class:`AckLevel` each answer states;
- :class:`Pipeline` and its stages (:class:`Filter`, :class:`Map`, :class:`Validate`,
  :class:`Dedupe`, :class:`TumblingWindow`, :class:`SlidingWindow`, plain functions);
- :class:`Reading` (what pipeline stages see) and :class:`Row` (what is stored and forwarded).
"""

from sockstack.edge.device import Device
from sockstack.edge.forward import ForwardSettings
from sockstack.edge.messages import AckLevel
from sockstack.edge.pattern import EdgeError, Relay, Sink
from sockstack.edge.pipeline import (
    Dedupe,
    Filter,
    Map,
    Pipeline,
    SlidingWindow,
    TumblingWindow,
    Validate,
)
from sockstack.edge.records import Reading, Row
from sockstack.edge.store import StoreLimits

__all__ = [
    "AckLevel",
    "Dedupe",
    "Device",
    "EdgeError",
    "Filter",
    "ForwardSettings",
    "Map",
    "Pipeline",
    "Reading",
    "Relay",
    "Row",
    "Sink",
    "SlidingWindow",
    "StoreLimits",
    "TumblingWindow",
    "Validate",
]
