export { SsehubClient } from "./client.js";
export { SseParser, type SseFrame } from "./parser.js";
export { backoffDelay } from "./stream.js";
export type { ShareEnvironment } from "./share.js";
export {
  SsehubError,
  type SsehubClientOptions,
  type SsehubEvent,
  type SsehubNotice,
  type SsehubRole,
  type SsehubStatus,
  type TokenSource,
} from "./types.js";
