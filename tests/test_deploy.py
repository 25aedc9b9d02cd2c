"""The deployment files: docker-compose.yml, the Dockerfile, and what a deployment installs.

There is no Docker engine (nor ``docker compose``) where the tests run, so
these read the files themselves; PyYAML comes with ``uvicorn[standard]``.
"""

from __future__ import annotations

import ast
import re
import tomllib

import yaml

from tests.support import ROOT

REQUIRED = ("SSEHUB_SECRET_KEY", "SSEHUB_ADMIN_USERNAME", "SSEHUB_ADMIN_PASSWORD")


def _compose() -> dict[str, object]:
    compose: dict[str, object] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose


def test_compose_requires_the_secrets_and_has_no_default_password() -> None:
    """``${VAR:?message}``: compose refuses to start without them, instead of an admin
    password every reader of this repository knows."""
    services = _compose()["services"]
    assert isinstance(services, dict)
    instances = {name: svc for name, svc in services.items() if name.startswith("ssehub")}
    assert len(instances) == 2
    for name, service in instances.items():
        env = service["environment"]
        for var in REQUIRED:
            assert re.fullmatch(rf"\$\{{{var}:\?[^}}]+\}}", env[var]), (name, var, env[var])
    assert "change-me" not in (ROOT / "docker-compose.yml").read_text()


def test_compose_publishes_ports_on_localhost_only() -> None:
    services = _compose()["services"]
    assert isinstance(services, dict)
    published = [str(port) for svc in services.values() for port in svc.get("ports", [])]
    assert published, "the instances are published somewhere"
    for port in published:
        assert port.startswith("127.0.0.1:"), port


def _instruction(dockerfile: str, name: str) -> str:
    """The last ``name`` instruction, continuation lines joined."""
    joined = dockerfile.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.startswith(name + " ")][-1]


def test_the_image_health_check_asks_the_port_serve_listens_on() -> None:
    """The image's CMD and HEALTHCHECK both take the port from ``SSEHUB_PORT``
    (``ssehub healthcheck`` asks ``/readyz`` there: readiness, so a process whose
    database or listener is down leaves the rotation); neither names a port of
    its own, so setting ``SSEHUB_PORT`` moves both."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    healthcheck = _instruction(dockerfile, "HEALTHCHECK")
    assert healthcheck.endswith('CMD ["ssehub", "healthcheck"]'), healthcheck
    assert _instruction(dockerfile, "CMD") == 'CMD ["ssehub", "serve"]'
    env = _instruction(dockerfile, "ENV")
    assert re.search(r"\bSSEHUB_PORT=8000\b", env) and re.search(r"\bSSEHUB_HOST=0\.0\.0\.0\b", env)
    assert "8000" not in healthcheck


def _imported_modules(package: str) -> set[str]:
    modules = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module.split(".")[0])
    return modules


def test_sse_starlette_is_installed_only_for_the_benchmarks() -> None:
    """A deployment installs what it runs: only bench/ uses sse-starlette."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=\[ ]", dep, maxsplit=1)[0] for dep in project["dependencies"]]
    assert "sse-starlette" not in names
    bench = project["optional-dependencies"]["bench"]
    assert any(dep.startswith("sse-starlette") for dep in bench)
    assert "sse_starlette" not in _imported_modules("app")
    assert "sse_starlette" in _imported_modules("bench")
