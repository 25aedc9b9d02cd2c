// A scripted SSE server on a real socket, for the client's state machine: each
// connection to /stream is answered by the next handler (the last one repeats).
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

export type Handler = (req: IncomingMessage, res: ServerResponse) => void;

export interface Scripted {
  url: string;
  /** Every /stream request, in order: its query's last_event_id and Authorization header. */
  requests: Array<{ lastEventId: string | null; authorization: string | undefined; at: number }>;
  close(): Promise<void>;
}

export async function scripted(handlers: Handler[]): Promise<Scripted> {
  const requests: Scripted["requests"] = [];
  const open = new Set<ServerResponse>();
  const server = createServer((req, res) => {
    const url = new URL(req.url ?? "/", "http://x");
    if (url.pathname !== "/stream") {
      res.writeHead(404).end();
      return;
    }
    requests.push({
      lastEventId: url.searchParams.get("last_event_id"),
      authorization: req.headers.authorization,
      at: Date.now(),
    });
    open.add(res);
    res.on("close", () => open.delete(res));
    const handler = handlers[Math.min(requests.length, handlers.length) - 1];
    handler?.(req, res);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    requests,
    close: () =>
      new Promise((resolve) => {
        for (const res of open) res.destroy();
        server.close(() => resolve());
      }),
  };
}

export function sse(res: ServerResponse, ...frames: string[]): void {
  if (!res.headersSent) {
    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
    res.write("retry: 2000\n\n");
  }
  for (const frame of frames) res.write(frame);
}

export function event(id: number, channel = "news"): string {
  const body = { id, channel, type: "message", data: { n: id }, published_at: "2026-01-01T00:00:00Z" };
  return `id: ${id}\nevent: message\ndata: ${JSON.stringify(body)}\n\n`;
}

export function notice(type: string, data: object = {}): string {
  return `event: ${type}\ndata: ${JSON.stringify(data)}\n\n`;
}

export const LIVE = notice("ssehub.live", { replayed: 0 });

/** Wait until `condition` holds, polling; fails after `ms`. */
export async function until(condition: () => boolean, ms = 5000, what = "condition"): Promise<void> {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
