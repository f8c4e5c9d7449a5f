"""A site's hypervisors calling one server at the same moment, as after a reload."""
from __future__ import annotations

import socket
from typing import Callable


def statuses_of_a_burst(port: int, requests: list[bytes], start: Callable[[], None]) -> list[int]:
    """Opens one connection per request to a server that listens but does not accept yet, then
    calls `start` (the server begins accepting), sends the requests and returns the HTTP statuses.

    A SYN that a full accept queue dropped is retried by the kernel only after 1 s, so the short
    connect timeout turns a dropped connection into a failure.
    """
    socks = [socket.create_connection(("127.0.0.1", port), timeout=0.5) for _ in requests]
    try:
        start()
        for s, request in zip(socks, requests):
            s.sendall(request)
        statuses = []
        for s in socks:
            s.settimeout(10)
            statuses.append(int(s.recv(64).split(b" ")[1]))
        return statuses
    finally:
        for s in socks:
            s.close()
