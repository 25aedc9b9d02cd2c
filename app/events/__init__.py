"""The event log: the ordered write path, history, retention."""
