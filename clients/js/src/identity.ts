/**
 * Who a token belongs to, so that tabs share a stream only with tabs of the
 * same user. It is a partition key, not a check: ssehub verifies every token
 * itself; a key that names the wrong user would at worst hand a tab events of
 * a user whose token it already holds.
 */

/**
 * `iss` and `sub` of a JWT, read without verifying it: ssehub's own tokens
 * (access and stream tokens alike) carry `sub`, an identity provider's carry
 * `iss` as well, so no two users of one ssehub share a key. Null when the
 * token is not a JWT with a `sub`.
 */
export function jwtIdentity(token: string): string | null {
  const parts = token.split(".");
  if (parts.length !== 3 || !parts[1]) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = new TextDecoder().decode(
      Uint8Array.from(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)), (c) => c.charCodeAt(0)),
    );
    const claims = JSON.parse(json) as { iss?: unknown; sub?: unknown };
    if (typeof claims.sub !== "string" || claims.sub === "") return null;
    return `${typeof claims.iss === "string" ? claims.iss : ""}|${claims.sub}`;
  } catch {
    return null;
  }
}

/** The user's id from `GET /users/me`, for a token that is not a JWT; null when refused. */
export async function apiIdentity(base: string, token: string): Promise<string | null> {
  try {
    const response = await fetch(`${base}/users/me`, {
      headers: { Authorization: `Bearer ${token}` },
      cache: "no-store",
    });
    if (!response.ok) return null;
    const me = (await response.json()) as { id?: unknown };
    return typeof me.id === "number" || typeof me.id === "string" ? `user|${me.id}` : null;
  } catch {
    return null;
  }
}

/**
 * The identity to share by, or null: share alone.
 * - `share` a string: the application named it.
 * - a token: its JWT claims, else what `/users/me` says of it.
 * - the cookie (no token): null. Only the stream endpoints accept the stream
 *   cookie and scripts cannot read it, so nothing tells a tab whose it is;
 *   the application passes `share: userId` to share it.
 */
export async function identity(base: string, token: string | null, share: true | string): Promise<string | null> {
  if (typeof share === "string") return `app|${share}`;
  if (token === null) return null;
  return jwtIdentity(token) ?? (await apiIdentity(base, token));
}
