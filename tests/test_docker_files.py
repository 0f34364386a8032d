"""The cluster files cannot be run here (no Docker), so check what can be checked statically:
they parse, publish nothing beyond loopback, and keep every secret in docker/.env."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|_USER$", re.IGNORECASE)
VAR_REF = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def env_example() -> dict[str, str]:
    lines = (DOCKER / ".env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def strings(node) -> list[str]:
    """Every string in a parsed YAML document, keys included."""
    if isinstance(node, dict):
        return [text for key, value in node.items() for text in strings(key) + strings(value)]
    if isinstance(node, list):
        return [text for item in node for text in strings(item)]
    return [node] if isinstance(node, str) else []


def test_compose_has_the_cluster_services(compose):
    assert {"ray-head", "ray-worker", "mlflow", "postgres", "minio", "minio-init"} <= set(
        compose["services"]
    )
    worker = compose["services"]["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "container_name" not in worker  # `--scale ray-worker=N` needs unnamed containers
    assert "--head" in compose["services"]["ray-head"]["command"]
    mlflow = " ".join(compose["services"]["mlflow"]["command"])
    assert "--serve-artifacts" in mlflow and "s3://mlflow/" in mlflow


def test_ports_are_published_on_loopback_only(compose):
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert published, "the UI and Ray Client ports should be reachable from this machine"
    for port in published:
        assert isinstance(port, str) and port.startswith("127.0.0.1:"), port


def test_secrets_are_variable_references(compose):
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: use the mapping form for environment"
        for key, value in environment.items():
            if SECRET_NAME.search(key):
                assert VAR_REF.fullmatch(str(value)), f"{name}.{key} must be a ${{VAR}} reference"
    # With every ${VAR} removed, no URL may still carry a user or password before its "@".
    text = VAR_REF.sub("", "\n".join(strings(compose)))
    urls = re.findall(r"\w+://([^/\s@\"']*)@", text)
    assert urls, "the Postgres URL should be found"
    assert all(credentials in ("", ":") for credentials in urls), urls


def test_env_example_defines_every_required_variable_with_placeholders(compose):
    text = (DOCKER / "compose.yaml").read_text()
    required = {m.group(1) for m in re.finditer(r"\$\{([A-Z0-9_]+):\?", text)}
    example = env_example()
    assert required <= set(example), f"missing from .env.example: {required - set(example)}"
    for key, value in example.items():
        if re.search(r"PASSWORD|SECRET|TOKEN", key):
            assert "change-me" in value, f"{key} in .env.example must be a placeholder"
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_dockerfile_installs_the_package_as_a_non_root_ray_image():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r'pip install [^\n]*"\.\[sweep\]"', text)
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and "root" not in users and users[-1] == "ray"
    assert text.rstrip().splitlines()[-2] == 'ENTRYPOINT ["ray"]'
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS worker", text, re.MULTILINE)
    assert "nvidia/cuda:" in text
