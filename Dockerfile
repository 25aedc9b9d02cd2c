# Build: a virtualenv with ssehub and its dependencies.
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/ssehub
COPY pyproject.toml requirements.lock README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
COPY clients/python ./clients/python
# The client too: `ssehub publish` and `ssehub tail` are its commands. The lock
# constrains every dependency to the versions the suite passed with.
RUN /opt/ssehub/bin/pip install --no-cache-dir -c requirements.lock ./clients/python .

# Run: the virtualenv, the migrations, an unprivileged user.
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 ssehub
COPY --from=build /opt/ssehub /opt/ssehub
COPY --chown=ssehub alembic.ini /srv/ssehub/alembic.ini
COPY --chown=ssehub migrations /srv/ssehub/migrations
ENV PATH=/opt/ssehub/bin:$PATH \
    SSEHUB_DATA_DIR=/home/ssehub/data \
    SSEHUB_HOST=0.0.0.0 \
    SSEHUB_PORT=8000 \
    PYTHONUNBUFFERED=1
WORKDIR /srv/ssehub
USER ssehub
EXPOSE 8000
# Readiness, not liveness: a process whose database or cross-instance listener
# is down answers /readyz with 503 and must be taken out of rotation. Both this
# and `ssehub serve` take the port from SSEHUB_PORT: set it to move both.
# The start period covers an instance that waits for its database.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["ssehub", "healthcheck"]
CMD ["ssehub", "serve"]
