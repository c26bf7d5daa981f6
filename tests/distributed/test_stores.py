"""Where the job's TCPStores listen: loopback on one node, MASTER_ADDR's address across nodes, never every
interface when a narrower address works (torch's own default)."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch

from distrag.distributed import stores
from distrag.distributed.world import DistInfo
from distrag.errors import DistError


def _info(addr: str, *, one_node: bool = False, rank: int = 0) -> DistInfo:
    return DistInfo(rank, 3, rank, "trainer", rank, 2, 2, addr, 29500, one_node)


def _other_local_address() -> str | None:
    """A non-loopback address of this machine (the route to a private address; no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def _reachable(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("addr,one_node,expect", [
    ("127.0.0.1", False, ("127.0.0.1", "127.0.0.1")),
    ("localhost", False, ("127.0.0.1", "127.0.0.1")),
    ("::1", False, ("::1", "::1")),
    ("node-07.cluster", True, ("127.0.0.1", "127.0.0.1")),  # one node: loopback whatever MASTER_ADDR names
    ("192.0.2.7", False, ("192.0.2.7", "192.0.2.7")),  # several nodes: MASTER_ADDR's address only
])
def test_store_addresses(addr, one_node, expect):
    assert stores.store_addresses(_info(addr, one_node=one_node)) == expect


def test_a_host_name_that_resolves_to_loopback_across_nodes_listens_everywhere(monkeypatch):
    """/etc/hosts mapping the node's name to 127.0.1.1: binding that would lock the other nodes out."""
    monkeypatch.setattr(stores.socket, "getaddrinfo", lambda *a, **k: [(0, 0, 0, "", ("127.0.1.1", 0))])
    assert stores.store_addresses(_info("node01")) == ("node01", None)
    monkeypatch.setattr(stores.socket, "getaddrinfo", lambda *a, **k: [(0, 0, 0, "", ("10.1.2.3", 0))])
    assert stores.store_addresses(_info("node01")) == ("node01", "10.1.2.3")


def test_the_store_listens_on_loopback_only():
    other = _other_local_address()
    if other is None:
        pytest.skip("this machine has no non-loopback address")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = stores.open_store(_info("127.0.0.1"), port, timedelta(seconds=10))
    client = torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
    client.set("k", "v")
    assert store.get("k") == b"v" and _reachable("127.0.0.1", port)
    assert not _reachable(other, port)
    # what the binding closes: torch's default host listens on every interface
    open_default = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    assert _reachable(other, open_default.port)


def test_a_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(DistError, match="choose another MASTER_PORT"):
            stores.open_store(_info("127.0.0.1"), s.getsockname()[1], timedelta(seconds=5))


def test_an_address_that_is_not_this_hosts_falls_back_to_every_interface(caplog, monkeypatch):
    """MASTER_ADDR resolves to an address this host cannot bind (NAT, a floating address) although it
    reaches this host: the store still starts, loudly, as torch would have started it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(stores, "store_addresses", lambda info: ("127.0.0.1", "192.0.2.99"))
    with caplog.at_level("WARNING", logger="distrag.distributed.stores"):
        store = stores.open_store(_info("gateway"), port, timedelta(seconds=5))
    assert store.port == port and "listens on every interface" in caplog.text
