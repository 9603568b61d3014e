"""Tasks that show what a handler may still do inside the hardened unit."""

from __future__ import annotations

import ctypes
import os
import socket
import time
from typing import Any

from workers import task


@task("sleep")
def sleep(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Sleep for payload['seconds'], reporting progress."""
    seconds = float(payload["seconds"])
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ctx.progress(100 * (1 - left / seconds), step="sleeping")
        time.sleep(min(left, 0.1))
    return {"slept": seconds}


@task("probe")
def probe(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Open the sockets handlers need (IPv4, IPv6, Unix) and call through a ctypes callback."""
    results: dict[str, Any] = {"uid": os.getuid()}
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_STREAM) as server:
            server.bind((host, 0))
            server.listen()
            with socket.create_connection(server.getsockname()[:2], timeout=5) as client:
                peer, _ = server.accept()
                with peer:
                    client.sendall(b"ping")
                    results[family.name] = peer.recv(4).decode()
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        left.sendall(b"ping")
        results["AF_UNIX"] = right.recv(4).decode()
    compare = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    numbers = (ctypes.c_int * 3)(3, 1, 2)

    def by_value(a: Any, b: Any) -> int:
        return (
            ctypes.cast(a, ctypes.POINTER(ctypes.c_int))[0]
            - ctypes.cast(b, ctypes.POINTER(ctypes.c_int))[0]
        )

    libc = ctypes.CDLL(None)
    libc.qsort(numbers, 3, ctypes.sizeof(ctypes.c_int), compare(by_value))
    results["ctypes_callback"] = list(numbers)
    return results


@task("hang", max_retries=0, timeout=1)
def hang(ctx: Any, payload: dict[str, Any]) -> None:
    """Runs past its timeout: the supervisor asks for its stack (SIGUSR1), then kills it."""
    time.sleep(600)
