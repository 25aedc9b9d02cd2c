# Build: a virtualenv with ssehub and its dependencies.
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/ssehub
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
COPY clients/python ./clients/python
# The client too: `ssehub publish` and `ssehub tail` are its commands.
RUN /opt/ssehub/bin/pip install --no-cache-dir ./clients/python .

# Run: the virtualenv, the migrations, an unprivileged user.
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 ssehub
COPY --from=build /opt/ssehub /opt/ssehub
COPY --chown=ssehub alembic.ini /srv/ssehub/alembic.ini
COPY --chown=ssehub migrations /srv/ssehub/migrations
ENV PATH=/opt/ssehub/bin:$PATH \
    SSEHUB_DATA_DIR=/home/ssehub/data \
    PYTHONUNBUFFERED=1
WORKDIR /srv/ssehub
USER ssehub
EXPOSE 8000
# Readiness, not liveness: a process whose database or cross-instance listener
# is down answers /readyz with 503 and must be taken out of rotation.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"
CMD ["ssehub", "serve", "--host", "0.0.0.0", "--port", "8000"]
