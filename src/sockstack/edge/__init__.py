"""Edge and fog relays (issue 15, docs/EDGE.md): ingest from devices, pre-process in a pipeline,
keep what was accepted in a durable outbox and forward it upstream, exactly once at the sink."""

from sockstack.edge.records import Reading, Row

__all__ = ["Reading", "Row"]
