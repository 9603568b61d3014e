"""Nodes in their own network namespaces, joined to this host by veth pairs, and cut off at will.

Each node is a namespace holding one end of a veth pair; the other end stays on the host,
with its own address, which a server on the host (PostgreSQL) listens on. `cut(node)` sets
the host's end down: from then on every packet between the node and the host is lost
without a word, as in a real partition (the node's established connections time out, its
new ones find no route); `heal(node)` sets it up again. Needs root and `ip` (iproute2).

Names carry this process's pid, so a run never touches another run's namespaces, and the
leftovers of a run that was killed before its clean-up are removed by the next one.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import shutil
import subprocess
from dataclasses import dataclass

PREFIX = "taskherd-"  # namespace names: taskherd-<pid>-<node>


class Unavailable(Exception):
    """Network namespaces cannot be made here (the reason is the message)."""


@dataclass(frozen=True)
class Node:
    """One namespace and its link to the host."""

    name: str
    namespace: str
    host_link: str  # the veth end on the host (what cut() sets down)
    host_address: str  # the host's address on that link: where the node reaches the host
    address: str  # the node's own address

    @property
    def prefix(self) -> tuple[str, ...]:
        """Run a command inside the node: prefix + argv."""
        return ("ip", "netns", "exec", self.namespace)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise Unavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def _quietly(*args: str) -> None:
    subprocess.run(["ip", *args], capture_output=True, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.0.0.0/8 that no address or route of this host falls in."""
    used = "".join(
        subprocess.run(["ip", "-4", *what], capture_output=True, text=True).stdout
        for what in (("-o", "addr"), ("route",))
    )
    for _ in range(100):
        subnet = ipaddress.IPv4Network(
            f"10.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24"
        )
        stem = str(subnet.network_address).rsplit(".", 1)[0] + "."
        if stem not in used:
            return subnet
    raise Unavailable("no free 10.x.y.0/24 subnet for the veth pairs")


def remove_leftovers() -> None:
    """Delete the namespaces and links of earlier runs whose process is gone."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for namespace in re.findall(rf"^({PREFIX}(\d+)-\S+)", listed, re.MULTILINE):
        name, pid = namespace
        if not os.path.exists(f"/proc/{pid}"):
            _quietly("netns", "delete", name)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for link, pid in re.findall(r"^\d+: (th(\d+)n\d+h)@", links, re.MULTILINE):
        if not os.path.exists(f"/proc/{pid}"):
            _quietly("link", "delete", link)


class Network:
    """Namespaced nodes on one host; `close()` removes every namespace and link it made."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise Unavailable("network namespaces need root")
        if shutil.which("ip") is None:
            raise Unavailable("no `ip` command (install iproute2)")
        remove_leftovers()
        self.subnet = _free_subnet()
        self.nodes: list[Node] = []
        self._hosts = list(self.subnet.hosts())

    def add(self, name: str) -> Node:
        """A new namespace joined to the host by a /30 of its own, loopback up."""
        index = len(self.nodes)
        host_address, address = self._hosts[4 * index], self._hosts[4 * index + 1]
        tag = f"th{os.getpid()}n{index}"
        node = Node(
            name=name,
            namespace=f"{PREFIX}{os.getpid()}-{name}",
            host_link=f"{tag}h",
            host_address=str(host_address),
            address=str(address),
        )
        self.nodes.append(node)  # close() removes it, even if a step below fails
        inside = ("netns", "exec", node.namespace, "ip")
        _ip("netns", "add", node.namespace)
        _ip("link", "add", node.host_link, "type", "veth", "peer", "name", f"{tag}p")
        _ip("link", "set", f"{tag}p", "netns", node.namespace)
        _ip("addr", "add", f"{host_address}/30", "dev", node.host_link)
        _ip("link", "set", node.host_link, "up")
        _ip(*inside, "addr", "add", f"{address}/30", "dev", f"{tag}p")
        _ip(*inside, "link", "set", f"{tag}p", "up")
        _ip(*inside, "link", "set", "lo", "up")
        return node

    def cut(self, node: Node) -> None:
        """From now on, every packet between the node and the host is lost."""
        _ip("link", "set", node.host_link, "down")

    def heal(self, node: Node) -> None:
        _ip("link", "set", node.host_link, "up")

    def close(self) -> None:
        for node in self.nodes:
            _quietly("link", "delete", node.host_link)  # its peer goes with it
            _quietly("netns", "delete", node.namespace)
        self.nodes.clear()
