/**
 * An incremental Server-Sent Events parser, as the WHATWG HTML standard
 * ("Parsing an event stream") reads a `text/event-stream` body.
 *
 * It takes decoded text in chunks of any size: a line, a field or a CR LF pair
 * split across two chunks parses the same as in one. What the standard leaves
 * to the EventSource object (the reconnection time, the last event id kept
 * across frames) is reported, not acted on: the caller decides.
 */

/** One dispatched frame. */
export interface SseFrame {
  /** The frame's own `id:` field; undefined when the frame had none (ssehub's notices). */
  id: string | undefined;
  /** The `event:` field, `"message"` when absent or empty. */
  event: string;
  /** The `data:` lines joined with "\n". */
  data: string;
}

export class SseParser {
  private rest = "";
  private afterCR = false;
  private started = false;
  private data: string[] = [];
  private event = "";
  private id: string | undefined = undefined;

  /**
   * @param onFrame called for every frame that has data, in order.
   * @param onRetry called with a `retry:` field's milliseconds (digits only, as the standard says).
   */
  constructor(
    private readonly onFrame: (frame: SseFrame) => void,
    private readonly onRetry: (ms: number) => void = () => {},
  ) {}

  /** Feed the next piece of decoded text. */
  push(text: string): void {
    if (!this.started) {
      if (text === "") return;
      this.started = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1); // one leading BOM is not content
    }
    let start = 0;
    // A CR that ended the previous chunk already ended its line: a LF right after it is
    // the same line break, not an empty line (which would dispatch a frame early).
    if (this.afterCR && text.charCodeAt(0) === 10) start = 1;
    this.afterCR = false;
    for (let i = start; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      const line = this.rest + text.slice(start, i);
      this.rest = "";
      if (c === 13) {
        if (i + 1 === text.length) this.afterCR = true;
        else if (text.charCodeAt(i + 1) === 10) i++;
      }
      start = i + 1;
      this.line(line);
    }
    this.rest += text.slice(start);
  }

  private line(line: string): void {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.charCodeAt(0) === 58) return; // ":" a comment (ssehub's heartbeat)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.charCodeAt(0) === 32) value = value.slice(1);
    switch (field) {
      case "data":
        this.data.push(value);
        break;
      case "event":
        this.event = value;
        break;
      case "id":
        if (!value.includes("\0")) this.id = value;
        break;
      case "retry":
        if (/^[0-9]+$/.test(value)) this.onRetry(Number(value));
        break;
      default: // unknown fields are ignored
    }
  }

  private dispatch(): void {
    const frame: SseFrame = { id: this.id, event: this.event || "message", data: this.data.join("\n") };
    const hasData = this.data.length > 0;
    this.data = [];
    this.event = "";
    this.id = undefined;
    if (hasData) this.onFrame(frame);
  }
}
