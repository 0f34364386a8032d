"""Test hosts as Linux network namespaces (`scripts/testbed.sh`, one source for people and
tests): head, worker1, worker2 and laptop on one bridge in 198.18.0.0/24, each with its own
HOME, data cache and TMPDIR, and a folder they all share."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "testbed.sh"
HOSTS = ("head", "worker1", "worker2", "laptop")


def why_not_here() -> str | None:
    """Why namespaces cannot be made on this machine; None when they can."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "iproute2's ip command is missing"
    return None


def require_namespaces() -> None:
    """Skip where namespaces cannot be made, saying why; under CI=true that is a failure."""
    if reason := why_not_here():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the multi-host tests, but {reason}")
        pytest.skip(reason)


@dataclass
class Testbed:
    __test__ = False  # a helper, not a test class

    name: str  # prefixes the namespaces and links it made
    root: Path  # every host's folders and the shared one

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "TESTBED_NAME": self.name, "TESTBED_ROOT": str(self.root)}

    def script(self, *args: str) -> str:
        done = subprocess.run(["bash", str(SCRIPT), *args], env=self.env, check=True,
                              capture_output=True, text=True, timeout=60)
        return done.stdout.strip()

    def address(self, host: str) -> str:
        return self.script("address", host)

    def popen(self, host: str, *command: str, **kwargs) -> subprocess.Popen:
        """`command` on `host`, with that host's environment (its HOME, cache and TMPDIR)."""
        return subprocess.Popen(["bash", str(SCRIPT), "run", host, "--", *command],
                                env=self.env, **kwargs)

    def run(self, host: str, *command: str, timeout: float = 60) -> str:
        with self.popen(host, *command, stdout=subprocess.PIPE, text=True) as process:
            out, _ = process.communicate(timeout=timeout)
        assert process.returncode == 0, f"{command} on {host}: exit {process.returncode}"
        return out

    def up(self) -> None:
        self.script("up")

    def down(self) -> None:
        self.script("down")

    def namespaces(self) -> list[str]:
        listed = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True,
                                text=True).stdout
        return [line.split()[0] for line in listed.splitlines()
                if line.startswith(f"{self.name}-")]

    def links(self) -> list[str]:
        listed = subprocess.run(["ip", "-o", "link", "show"], check=True, capture_output=True,
                                text=True).stdout
        return [line.split(":")[1].strip() for line in listed.splitlines()
                if line.split(":")[1].strip().startswith(self.name)]
