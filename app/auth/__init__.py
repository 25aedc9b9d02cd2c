"""Users, passwords, JWTs and the current-user dependencies."""
