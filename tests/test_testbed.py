"""The multi-host test hosts (issue #23, item 1): four network namespaces that reach each other
by their own addresses, keep their own folders, share one, and leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from testbed import HOSTS, Testbed, require_namespaces

ECHO_SERVER = """
import os, socket, sys
server = socket.create_server((os.environ["TESTBED_ADDRESS"], 0))
print(server.getsockname()[1], flush=True)  # ready: the port a client may now connect to
connection, _ = server.accept()
connection.sendall(os.environ["TESTBED_HOST"].encode())
connection.close()
"""
ECHO_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as connection:
    print(connection.recv(64).decode())
"""


@pytest.fixture
def testbed(tmp_path):
    require_namespaces()
    bed = Testbed(f"tb{os.getpid() % 100000}", tmp_path / "testbed")
    bed.up()
    try:
        yield bed
    finally:
        bed.down()


def test_four_hosts_reach_each_other_by_address_and_keep_their_own_folders(testbed):
    addresses = {host: testbed.address(host) for host in HOSTS}
    assert len(set(addresses.values())) == 4
    assert all(a.startswith("198.18.0.") for a in addresses.values())
    for host in HOSTS:  # each host has exactly its own address, and loopback
        shown = testbed.run(host, "ip", "-4", "-o", "addr", "show")
        assert {line.split()[3] for line in shown.splitlines()} == {
            "127.0.0.1/8", f"{addresses[host]}/24"}

    # worker1 connects to a server on head's address: one host to another over the bridge.
    with testbed.popen("head", sys.executable, "-c", ECHO_SERVER, stdout=subprocess.PIPE,
                       text=True) as server:
        port = server.stdout.readline().strip()
        reply = testbed.run("worker1", sys.executable, "-c", ECHO_CLIENT, addresses["head"],
                            port)
        assert server.wait(timeout=30) == 0
    assert reply.strip() == "head"

    homes = {host: testbed.run(host, "sh", "-c", "echo $HOME $TMPDIR $MIM4DD_DATA").split()
             for host in HOSTS}
    assert len({tuple(folders) for folders in homes.values()}) == 4  # nothing shared
    testbed.run("worker2", "sh", "-c", 'echo from-worker2 > "$TESTBED_SHARED/note"')
    assert testbed.run("laptop", "sh", "-c", 'cat "$TESTBED_SHARED/note"').strip() == \
        "from-worker2"


def test_down_removes_every_namespace_link_process_and_folder(tmp_path):
    require_namespaces()
    bed = Testbed(f"td{os.getpid() % 100000}", tmp_path / "testbed")
    bed.up()
    sleeper = bed.popen("worker2", sys.executable, "-c", "import time; time.sleep(600)")
    assert len(bed.namespaces()) == 4 and bed.links()
    bed.down()
    assert sleeper.wait(timeout=30) != 0  # killed with its host
    assert bed.namespaces() == [] and bed.links() == [] and not bed.root.exists()
    bed.down()  # again: nothing left to remove is not an error
