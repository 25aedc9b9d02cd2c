"""A client for ssehub: publish with safe retries, stream with exact resume.

from ssehub_client import Client
with Client("https://push.example.com", api_key="ssehub_...") as hub:
    hub.publish("orders", {"id": 42, "state": "paid"}, type="order.paid")

from ssehub_client import AsyncClient
async with AsyncClient("https://push.example.com", token=token) as hub:
    async for item in hub.stream("orders"):
        print(item)   # an Event, or a Notice (ssehub.live, ssehub.truncated, ...)
"""

from ssehub_client.client import AsyncClient, Client, Event, Notice, SsehubError, username_for

__all__ = ["AsyncClient", "Client", "Event", "Notice", "SsehubError", "username_for"]
