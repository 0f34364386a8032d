"""The embedded Ray cluster is reachable from this machine only: while it runs, every socket
its processes listen on is a loopback one, and a driver joining through the machine's network
address gets nowhere. A cluster address keeps the user's Ray authentication settings."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stop_shared_ray
from processes import HAS_PROC

from orchestrator import tune_run

# A driver that joins the given address and runs a task writing the given file.
JOIN = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
@ray.remote
def write(path):
    open(path, "w").write("ran")
print("JOINED", ray.get(write.remote(sys.argv[2]), timeout=20))
"""
# Give up on an unreachable GCS within seconds rather than minutes.
FAST_GIVE_UP = {
    "RAY_gcs_rpc_server_connect_timeout_s": "1",
    "RAY_py_gcs_connect_timeout_s": "2",
    "RAY_gcs_server_port_wait_time_s": "1",
}


def listening() -> dict[str, tuple[str, int]]:
    """Every listening TCP socket on this machine: inode -> (address, port)."""
    table = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            table[fields[9]] = (socket.inet_ntop(family, raw), int(port, 16))
    return table


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def sockets_of(pids: list[int]) -> dict[str, int]:
    """The socket inodes the processes hold: inode -> pid."""
    held = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue  # gone, or not ours
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                held[target[len("socket:["):-1]] = pid
    return held


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:  # ::ffff:127.0.0.1
        ip = ip.ipv4_mapped
    return ip.is_loopback


def machine_address() -> str | None:
    """The address Ray would pick for this node on its own, if it is not a loopback one."""
    from ray._common.network_utils import node_ip_address_from_perspective

    address = node_ip_address_from_perspective()
    return None if is_loopback(address) else address


@pytest.fixture(scope="module")
def embedded():
    """A sweep's Ray session on the embedded cluster, with a task run in a runtime env (as
    Tune's trials are): yields the listening sockets that appeared meanwhile, as
    {(address, port): pid}, the GCS port, and whether the SIGTERM handler the session was
    entered with was still this process's inside it (checked again after it)."""
    import ray

    saved = {name: os.environ.pop(name, None) for name in ("RAY_ADDRESS", tune_run.BIND_ENV)}
    stop_shared_ray()  # the cluster under test is the one a sweep's session starts
    before = set(listening())

    def launchs_handler(signum, frame):  # stands for `locks.stop_on_sigterm`'s
        raise AssertionError("not called")

    previous = signal.signal(signal.SIGTERM, launchs_handler)
    try:
        with tune_run.ray_session(None):
            @ray.remote(runtime_env={"env_vars": {"MIM4DD_PROBE": "1"}})
            def probe() -> str:
                return os.environ["MIM4DD_PROBE"]

            assert ray.get(probe.remote()) == "1"
            gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
            table = listening()
            held = sockets_of(process_tree(os.getpid()))
            opened = {table[i]: pid for i, pid in held.items() if i in table and i not in before}
            yield opened, gcs_port, signal.getsignal(signal.SIGTERM) is launchs_handler
        assert not ray.is_initialized()
        # ray.init's handler (exit at once) outlived the session: a SIGTERM while a launch
        # aggregated left its runs RUNNING
        assert signal.getsignal(signal.SIGTERM) is launchs_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
        for name, value in saved.items():
            if value is not None:
                os.environ[name] = value


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PROC, reason="reads sockets from /proc")
def test_embedded_cluster_listens_on_loopback_only(embedded):
    opened, gcs_port, _ = embedded
    assert gcs_port in {port for _, port in opened}, f"no GCS socket among {opened}"
    exposed = {sock: pid for sock, pid in opened.items() if not is_loopback(sock[0])}
    assert not exposed, f"Ray listens beyond loopback: {exposed}"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PROC, reason="reads sockets from /proc")
def test_embedded_cluster_cannot_be_joined_from_the_network(embedded, tmp_path):
    _, gcs_port, _ = embedded
    address = machine_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    with socket.socket() as sock:  # nothing answers on the machine's address
        sock.settimeout(5)
        assert sock.connect_ex((address, gcs_port)) != 0
    marker = tmp_path / "joined"
    env = {**os.environ, **FAST_GIVE_UP}
    env.pop("RAY_ADDRESS", None)
    try:
        joined = subprocess.run(
            [sys.executable, "-c", JOIN, f"{address}:{gcs_port}", str(marker)],
            capture_output=True, text=True, timeout=90, env=env,
        )
        assert joined.returncode != 0, joined.stdout
        assert "JOINED" not in joined.stdout
    except subprocess.TimeoutExpired:
        pass  # it never got in either
    assert not marker.exists()


@pytest.mark.skipif(not HAS_PROC, reason="reads sockets from /proc")
def test_a_sweeps_ray_session_keeps_the_launchs_sigterm_handler(embedded):
    """`ray.init` installs a SIGTERM handler that exits at once; a launch's stops it as Ctrl-C
    would (runs end KILLED), in set-up and aggregation too, not only while Tune runs."""
    *_, kept = embedded
    assert kept


def test_network_bind_refused_without_token_auth(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv(tune_run.BIND_ENV, "network")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(RuntimeError, match="token authentication"):
        tune_run.start_local(num_cpus=1)
    assert not calls  # refused before Ray starts


def test_non_loopback_embedded_cluster_refused(monkeypatch):
    """Should Ray put the embedded cluster on a network address, it is stopped at once."""
    import ray
    from ray._private import ray_constants

    stopped = []
    started = type("Context", (), {"address_info": {"node_ip_address": "192.0.2.7"}})
    monkeypatch.setattr(ray, "init", lambda **kwargs: started)
    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append(True))
    monkeypatch.delenv(tune_run.BIND_ENV, raising=False)
    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    with pytest.raises(RuntimeError, match="not loopback"):
        tune_run.start_local(num_cpus=1)
    assert stopped
    assert ray_constants.ENABLE_RAY_CLUSTER == cluster_mode  # Ray's switch is put back


def test_cluster_address_keeps_the_users_auth(monkeypatch):
    """Connecting to a cluster neither disables Ray's authentication nor sends workers a
    RAY_AUTH_MODE of ours."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    for name, value in tune_run.RAY_ENV.items():
        monkeypatch.setenv(name, value)
    assert tune_run._init_ray("ray://head:10001")
    (kwargs,) = calls
    assert kwargs["address"] == "ray://head:10001"
    assert "RAY_AUTH_MODE" not in os.environ
    assert "RAY_AUTH_MODE" not in kwargs["runtime_env"]["env_vars"]
