"""The address a node serves and talks on: chosen, not guessed.

One choice per node is used for vLLM, Ray, Gloo and NCCL alike. The ``network`` setting names it
(an interface such as ``ib0``, or a CIDR such as ``10.1.0.0/16``); by default a follower takes the
address its route to node 0 leaves from, and node 0 the address its hostname resolves to when that
is one of its own, else its first global, non-loopback interface. Stdlib only (Linux ioctls).
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass

from ..errors import HpcServeError

_SIOCGIFFLAGS, _SIOCGIFADDR = 0x8913, 0x8915
_IFF_UP, _IFF_LOOPBACK = 0x1, 0x8


@dataclass(frozen=True)
class Interface:
    """One network interface with an IPv4 address."""

    name: str
    ip: str
    up: bool
    loopback: bool


@dataclass(frozen=True)
class Address:
    """The chosen address, the interface it belongs to (when known) and why it was chosen."""

    ip: str
    interface: str | None
    how: str


def interfaces() -> list[Interface]:
    """This machine's interfaces that have an IPv4 address, in index order."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                ip = socket.inet_ntoa(fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)[20:24])
                flags = struct.unpack("H", fcntl.ioctl(probe.fileno(), _SIOCGIFFLAGS, request)[16:18])[0]
            except OSError:
                continue  # no IPv4 address on it
            found.append(Interface(name, ip, bool(flags & _IFF_UP), bool(flags & _IFF_LOOPBACK)))
    return found


def _is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def _route_source(peer: str) -> str | None:
    """The local address the kernel would use to reach ``peer`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((peer, 9))
            return probe.getsockname()[0]
    except OSError:
        return None


def choose_address(network: str | None, head_ip: str | None = None,
                   hostname: str | None = None, found: list[Interface] | None = None) -> Address:
    """This node's address: from ``network`` when given, else the default described above.

    ``head_ip`` is node 0's address (None on node 0 itself). Raises HpcServeError when the named
    network is not on this node."""
    found = interfaces() if found is None else found
    names = ", ".join(f"{i.name} {i.ip}" for i in found) or "none"
    if network and "/" in network:
        net = ipaddress.ip_network(network, strict=False)
        for interface in found:
            if interface.up and ipaddress.ip_address(interface.ip) in net:
                return Address(interface.ip, interface.name, f"in --network {network}")
        raise HpcServeError(f"No interface of {socket.gethostname()} has an address in --network {network} "
                            f"(it has: {names}).", "Give the network all nodes share, or leave --network out.")
    if network:
        for interface in found:
            if interface.name == network:
                return Address(interface.ip, interface.name, f"interface {network}")
        raise HpcServeError(f"{socket.gethostname()} has no interface {network!r} with an IPv4 address "
                            f"(it has: {names}).", "Name one of those with --network, or leave it out.")
    by_ip = {i.ip: i for i in found if i.up}
    if head_ip and not _is_loopback(head_ip):
        source = _route_source(head_ip)
        if source in by_ip and not _is_loopback(source):
            return Address(source, by_ip[source].name, f"the route to node 0 ({head_ip})")
    try:
        resolved = socket.gethostbyname(hostname or socket.gethostname())
    except OSError:
        resolved = ""
    if resolved in by_ip and not _is_loopback(resolved):
        return Address(resolved, by_ip[resolved].name, "the hostname")
    for interface in found:
        if interface.up and not interface.loopback and not ipaddress.ip_address(interface.ip).is_link_local:
            return Address(interface.ip, interface.name, f"the first global interface ({interface.name})")
    return Address("127.0.0.1", "lo", "loopback: no other interface is up")
