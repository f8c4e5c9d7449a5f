"""A minimal synchronous QMP client for the two commands the wrapper sends (system_powerdown, quit).

QMP is line-delimited JSON over a unix socket; the qemu.qmp package is asyncio-based and would
pull an event loop into a process that otherwise needs none, for three request/response pairs.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


class QmpError(Exception):
    pass


class Qmp:
    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
            self._file = self._sock.makefile("rw", encoding="utf-8", newline="\n")
            self._read()  # the greeting
            self.execute("qmp_capabilities")
        except (OSError, ValueError) as e:
            self._sock.close()
            raise QmpError(f"QMP {path}: {e}") from None

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QmpError("QMP connection closed")
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._file.write(json.dumps(msg) + "\n")
        self._file.flush()
        while True:  # asynchronous events may arrive before the reply
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")

    def close(self) -> None:
        self._sock.close()
