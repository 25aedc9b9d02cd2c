"""``publish``, ``tail`` and ``presence`` from a shell: ``ssehub publish`` and so on
(and ``ssehub-client``, where only this package is installed).

The server and the credentials come from ``SSEHUB_URL`` (default
http://127.0.0.1:8000) and ``SSEHUB_API_KEY`` or ``SSEHUB_TOKEN``.

- ``publish CHANNEL JSON [--type T] [--key K]`` prints the event as JSON.
- ``tail CHANNEL... [--from ID]`` prints one JSON line per event, notices on
  stderr, and goes on across reconnects from the last id it printed. With a
  token it follows the channels' streams (several are merged as they arrive:
  in id order per channel); with only an API key, which may read history but
  not open a stream, it polls the history every second.
- ``presence CHANNEL`` prints who is online in a presence channel, one JSON
  line per user (``{"username", "streams", "since"}``), in username order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import httpx

from ssehub_client.client import RETRY_STATUSES, AsyncClient, Event, Notice, SsehubError

POLL_SECONDS = 1.0


def _client() -> AsyncClient:
    url = os.environ.get("SSEHUB_URL", "http://127.0.0.1:8000")
    api_key, token = os.environ.get("SSEHUB_API_KEY"), os.environ.get("SSEHUB_TOKEN")
    if not (api_key or token):
        sys.exit("set SSEHUB_API_KEY or SSEHUB_TOKEN")
    return AsyncClient(url, api_key=None if token else api_key, token=token)


def _line(value: Any) -> None:
    print(json.dumps(value, separators=(",", ":"), ensure_ascii=False), flush=True)


def _event_json(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "channel": event.channel,
        "type": event.type,
        "data": event.data,
        "published_at": event.published_at,
    }


async def publish(channel: str, data: str, type_: str, key: str | None) -> None:
    try:
        value = json.loads(data)
    except json.JSONDecodeError as exc:
        sys.exit(f"not JSON: {exc}")
    async with _client() as hub:
        _line(await hub.publish(channel, value, type=type_, idempotency_key=key))


async def tail(channels: Sequence[str], position: int | None) -> None:
    async with _client() as hub:
        if os.environ.get("SSEHUB_TOKEN"):
            async for item in hub.stream(list(channels), last_event_id=position):
                if isinstance(item, Notice):
                    print(f"{item.type} {json.dumps(item.data)}", file=sys.stderr, flush=True)
                else:
                    _line(_event_json(item))
        else:
            await _poll(hub, channels, position or 0)


async def presence(channel: str) -> None:
    async with _client() as hub:
        for user in (await hub.presence(channel))["users"]:
            _line(user)


async def _poll(hub: AsyncClient, channels: Sequence[str], after: int) -> None:
    """An API key reads history: follow each channel's ``next_after`` for ever."""
    positions = dict.fromkeys(channels, after)
    while True:
        for channel in channels:
            try:
                page = await hub.history(channel, positions[channel], 1000)
            except httpx.TransportError:
                break  # the server is away (a restart, a deploy): ask again next turn
            except SsehubError as exc:
                if exc.status not in RETRY_STATUSES:
                    raise
                break
            for event in page["events"]:
                _line(event)
                positions[channel] = event["id"]
        await asyncio.sleep(POLL_SECONDS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ssehub", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_commands(commands)
    run(parser.parse_args(argv))


def add_commands(commands: Any) -> None:
    """``publish``, ``tail`` and ``presence``, for this CLI and the server's ``ssehub``."""
    publish_p = commands.add_parser("publish", help="publish one event (JSON data)")
    publish_p.add_argument("channel")
    publish_p.add_argument("data", help="the event's data, as JSON")
    publish_p.add_argument("--type", default="message")
    publish_p.add_argument("--key", help="Idempotency-Key (default: a random one)")
    tail_p = commands.add_parser("tail", help="print events as JSON lines, live")
    tail_p.add_argument("channels", nargs="+", metavar="CHANNEL")
    tail_p.add_argument("--from", dest="position", type=int, help="start after this event id")
    presence_p = commands.add_parser("presence", help="who is online in a channel")
    presence_p.add_argument("channel")


def run(args: argparse.Namespace) -> None:
    try:
        if args.command == "publish":
            asyncio.run(publish(args.channel, args.data, args.type, args.key))
        elif args.command == "presence":
            asyncio.run(presence(args.channel))
        else:
            asyncio.run(tail(args.channels, args.position))
    except SsehubError as exc:
        sys.exit(f"ssehub: {exc.status} {exc.detail}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
