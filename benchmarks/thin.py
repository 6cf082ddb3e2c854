"""What the benchmark's thin clients share (``run.ThinConnection`` for HTTP/1.1,
``thin_grpc.ThinGrpcConnection`` for gRPC): one socket, a request sent with :meth:`send`, its
answer read with :meth:`receive` until complete; :meth:`call` does both, blocking."""

from __future__ import annotations

import socket


class ThinClient:
    """A closed-loop client on one socket (``_select_loop`` drives several from one thread)."""

    sock: socket.socket
    sent_at: float

    def send(self) -> None:
        raise NotImplementedError

    def receive(self) -> bool:
        """Read what the socket has; whether the answer is complete."""
        raise NotImplementedError

    def call(self) -> None:
        """One request and its whole answer (blocking)."""
        self.send()
        while not self.receive():
            pass

    def close(self) -> None:
        self.sock.close()
