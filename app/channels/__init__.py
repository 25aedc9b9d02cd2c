"""Channels, private membership and per-user subscriptions."""
