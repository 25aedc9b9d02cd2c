"""Live delivery: hub, streams, the cross-instance broker, SSE framing and routes."""
