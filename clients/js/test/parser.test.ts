import assert from "node:assert/strict";
import { test } from "node:test";

import { SseParser, type SseFrame } from "../src/parser.js";

function parse(chunks: string[]): { frames: SseFrame[]; retries: number[] } {
  const frames: SseFrame[] = [];
  const retries: number[] = [];
  const parser = new SseParser(
    (frame) => frames.push(frame),
    (ms) => retries.push(ms),
  );
  for (const chunk of chunks) parser.push(chunk);
  return { frames, retries };
}

const STREAM =
  "retry: 2000\n\n" +
  'id: 42\nevent: message\ndata: {"id":42,"channel":"news"}\n\n' +
  ": keep-alive\n\n" +
  'event: ssehub.live\ndata: {"replayed":0}\n\n' +
  "data: first line\ndata: second line\n\n";

const EXPECTED: SseFrame[] = [
  { id: "42", event: "message", data: '{"id":42,"channel":"news"}' },
  { id: undefined, event: "ssehub.live", data: '{"replayed":0}' },
  { id: undefined, event: "message", data: "first line\nsecond line" },
];

test("frames: events with an id, notices without, comments skipped, retry reported", () => {
  const { frames, retries } = parse([STREAM]);
  assert.deepEqual(frames, EXPECTED);
  assert.deepEqual(retries, [2000]);
});

test("a stream split at every position parses the same", () => {
  for (let i = 0; i <= STREAM.length; i++) {
    assert.deepEqual(parse([STREAM.slice(0, i), STREAM.slice(i)]).frames, EXPECTED, `split at ${i}`);
  }
  assert.deepEqual(parse([...STREAM]).frames, EXPECTED, "one character at a time");
});

test("CR LF and CR end lines as LF does, also when a CR LF pair is split", () => {
  for (const eol of ["\r\n", "\r"]) {
    const text = STREAM.replace(/\n/g, eol);
    assert.deepEqual(parse([text]).frames, EXPECTED, JSON.stringify(eol));
    for (let i = 0; i <= text.length; i++) {
      assert.deepEqual(parse([text.slice(0, i), text.slice(i)]).frames, EXPECTED, `${JSON.stringify(eol)} at ${i}`);
    }
  }
});

test("a leading BOM is dropped; field rules of the standard", () => {
  const { frames, retries } = parse([
    "\ufeffdata:no space\n\n",
    "data\n\n", // a field without a colon: empty value
    "id: 1\0\ndata: x\n\n", // an id with NUL is ignored
    "event: only-a-type\n\n", // no data: nothing dispatched
    "retry: soon\n\n", // not digits: ignored
    "unknown: field\ndata:  two spaces\n\n",
  ]);
  assert.deepEqual(frames, [
    { id: undefined, event: "message", data: "no space" },
    { id: undefined, event: "message", data: "" },
    { id: undefined, event: "message", data: "x" },
    { id: undefined, event: "message", data: " two spaces" },
  ]);
  assert.deepEqual(retries, []);
});

test("an incomplete frame is not dispatched until its blank line", () => {
  const frames: SseFrame[] = [];
  const parser = new SseParser((frame) => frames.push(frame));
  parser.push("id: 7\ndata: {}\n");
  assert.equal(frames.length, 0);
  parser.push("\n");
  assert.deepEqual(frames, [{ id: "7", event: "message", data: "{}" }]);
});
