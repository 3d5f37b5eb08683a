"""The Dockerfile, .dockerignore and compose.yaml state what operators rely on.

No Docker engine runs here, so these files are checked by parsing them (and by hadolint
where its wheel is installed): a multi-stage build on a slim base, a non-root runtime
without build tools, the ``lash-consumer run`` entry point, a health check over
``/healthz``, and a compose file whose workers wait for healthy PostgreSQL and RabbitMQ.
"""

from __future__ import annotations

import fnmatch
import json
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.services import in_ci

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def _logical_lines(text: str) -> list[str]:
    """Join backslash continuations, drop comments and blank lines."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(image=image, name=name))
        else:
            assert stages, f"instruction before FROM: {line}"
            stages[-1].instructions.append(Instruction(keyword, rest))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    _args, parsed = parse_dockerfile((ROOT / "Dockerfile").read_text())
    return parsed


def test_multi_stage_on_slim_python(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", stage.image), stage.image
    builder, runtime = stages[0], stages[-1]
    assert any("pip wheel" in i.args for i in builder.all("RUN"))
    installs = " ".join(i.args for i in runtime.all("RUN"))
    assert f"from={builder.name}" in installs and "pip install" in installs


def test_runtime_has_no_sources_or_build_tools(stages: list[Stage]) -> None:
    runtime = stages[-1]
    assert runtime.all("COPY") == [] and runtime.all("ADD") == []
    run = " ".join(i.args for i in runtime.all("RUN"))
    for tool in ("gcc", "build-essential", "make", "apt-get install", "git"):
        assert tool not in run
    assert "--no-cache-dir" in run


def test_runtime_runs_as_non_root(stages: list[Stage]) -> None:
    users = stages[-1].all("USER")
    assert users, "the runtime stage must set USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")


def test_exec_form_entrypoint_runs_lash_consumer(stages: list[Stage]) -> None:
    runtime = stages[-1]
    entrypoint = json.loads(runtime.all("ENTRYPOINT")[-1].args)
    cmd = json.loads(runtime.all("CMD")[-1].args)
    assert entrypoint + cmd == ["lash-consumer", "run"]


def test_exposes_http_port_and_checks_healthz_with_python(stages: list[Stage]) -> None:
    runtime = stages[-1]
    assert "8080" in runtime.all("EXPOSE")[-1].args.split()
    healthcheck = runtime.all("HEALTHCHECK")[-1].args
    exec_form = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert exec_form[0] == "python" and "/healthz" in exec_form[-1]
    env = " ".join(i.args for i in runtime.all("ENV"))
    assert "LASH_HTTP_PORT=8080" in env and "LASH_LOG_FORMAT=json" in env


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_build_copies(stages: list[Stage]) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        src
        for stage in stages
        for instruction in stage.all("COPY")
        if not instruction.args.startswith("--from")
        for src in instruction.args.split()[:-1]
    ]
    assert copied
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not _ignored(src.rstrip("/"), patterns), src
    for excluded in (".git", ".venv", "tests", "bench"):
        assert _ignored(excluded, patterns), excluded


def test_hadolint_is_clean() -> None:
    # The wheel puts the binary next to the interpreter, which may not be on PATH.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        if in_ci() and sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail("hadolint is missing although the test extra installs it here")
        pytest.skip("hadolint is not installed (the test extra installs it on linux x86_64)")
    result = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_compose_has_healthy_postgres_and_rabbitmq(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["postgres"]["image"] == "postgres:16"
    assert services["rabbitmq"]["image"] == "rabbitmq:3.13-management"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "rabbitmq-diagnostics" in services["rabbitmq"]["healthcheck"]["test"]


@pytest.mark.parametrize("worker", ["worker-1", "worker-2"])
def test_compose_workers(compose: dict[str, Any], worker: str) -> None:
    service = compose["services"][worker]
    assert service["build"] == "." or service["build"]["context"] == "."
    env = service["environment"]
    assert env["LASH_DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in env["LASH_DATABASE_URL"]
    assert env["LASH_AMQP_URL"].startswith("amqp://") and "@rabbitmq:5672" in env["LASH_AMQP_URL"]
    assert service["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "rabbitmq": {"condition": "service_healthy"},
    }
    assert "CMD" in service["healthcheck"]["test"]
    assert any("/readyz" in part or "/healthz" in part for part in service["healthcheck"]["test"])
    grace = int(str(service["stop_grace_period"]).rstrip("s"))
    assert grace > int(env["LASH_SHUTDOWN_GRACE_S"])
