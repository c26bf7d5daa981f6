"""The job's TCPStores (coordination and the trainers' rendezvous): where they listen.

torch's ``TCPStore`` has no bind-address argument: its host listens on every interface, so anyone who can
reach the node could talk to it. Here global rank 0 binds the listening socket itself, on the address
the job needs (:func:`store_addresses`), and hands it to the store through ``master_listen_fd``. A store
still has no authentication (anything on the same host, or on the job's network when it spans nodes, can
connect): what the refresh protocol sends through it is signed with the run's secret and verified by the
reader (:mod:`distrag.distributed.refresh_protocol`), so a stranger can at most disturb a run, never make
it open a file of their choosing. Launchers run stores of their own (torchrun's rendezvous on
MASTER_PORT); those are theirs to configure.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from datetime import timedelta
from typing import Any

import torch.distributed as tdist

from distrag.distributed.world import DistInfo
from distrag.errors import DistError

log = logging.getLogger(__name__)


def _is_loopback(addr: str) -> bool:
    try:
        return addr == "localhost" or ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def store_addresses(info: DistInfo) -> tuple[str, str | None]:
    """``(address the store clients connect to, address its host listens on)``; ``None``: every interface.

    * MASTER_ADDR a loopback address: that address (the job can only be on one node).
    * the job on one node (``info.one_node``: SLURM_NNODES, deepspeed's CROSS_SIZE, torchrun's
      LOCAL_WORLD_SIZE): 127.0.0.1 for both, whatever MASTER_ADDR names.
    * several nodes: MASTER_ADDR's address. If it resolves to a loopback address here (a host name
      mapped to 127.0.1.1 in /etc/hosts), binding that would lock the other nodes out: every interface.
    """
    addr = info.master_addr
    if _is_loopback(addr):
        addr = "127.0.0.1" if addr == "localhost" else addr
        return addr, addr
    if info.one_node:
        return "127.0.0.1", "127.0.0.1"
    try:
        ip = ipaddress.ip_address(socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)[0][4][0])
    except (OSError, ValueError, IndexError):
        return addr, None
    return (addr, None) if ip.is_loopback else (addr, str(ip))


def listen_socket(host: str, port: int) -> int:
    """A TCP socket listening on ``host:port`` only; its file descriptor, now owned by the caller."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock.detach()


def open_store(info: DistInfo, port: int, timeout: timedelta, *, client: bool = False) -> Any:
    """The TCPStore on ``port``: hosted by global rank 0, listening where :func:`store_addresses` says
    (every interface, with a warning, when that address cannot be used here); a client elsewhere, and
    always with ``client`` (a child process of a rank, e.g. the index worker)."""
    connect, bind = store_addresses(info)
    host = info.rank == 0 and not client
    kw: dict[str, Any] = {}
    if host and bind is not None:
        try:
            kw["master_listen_fd"] = listen_socket(bind, port)
        except OSError as e:
            if e.errno != errno.EADDRNOTAVAIL:
                raise DistError(f"cannot listen on {bind}:{port} (MASTER_PORT {info.master_port} + "
                                f"{port - info.master_port}): {e.strerror}; choose another MASTER_PORT") from None
            bind = None
    if host and bind is None:
        log.warning("MASTER_ADDR=%s cannot be bound on this host (it resolves to a loopback address, or to "
                    "an address this host cannot bind): the store on port %d listens on every interface; "
                    "published records stay signed", info.master_addr, port)
    return tdist.TCPStore(connect, port, world_size=None, is_master=host, timeout=timeout,
                          wait_for_workers=False, **kw)
