"""Live delivery: hub, subscribers, the cross-instance broker, SSE framing and routes."""
