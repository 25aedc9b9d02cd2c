"""ssehub: Server-Sent Events with JWT auth, Postgres channels and exact resume."""
