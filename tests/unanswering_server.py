"""A server that stops answering: a socket on 127.0.0.1 that accepts connections and then never
answers (an HTTP endpoint or a Postgres that hangs), or, with `postgres_login=True`, lets a
Postgres client log in (no SSL, no password) and then never answers a statement. It reads what
the client sends, so the client's writes never block, and it never closes a connection first:
only a client-side deadline ends the wait."""

import socket
import struct
import threading
from types import TracebackType

SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


class UnansweringServer:
    """`with UnansweringServer() as server:` ... `server.url` (as Postgres) or
    `server.endpoint` (as HTTP) ..."""

    def __init__(self, *, postgres_login: bool = False) -> None:
        self.login = postgres_login
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = int(self._sock.getsockname()[1])
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/test"
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self._clients: list[socket.socket] = []
        self._closed = threading.Event()

    def __enter__(self) -> "UnansweringServer":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed.set()
        self._sock.close()
        for client in self._clients:
            client.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            self._clients.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            if self.login:
                self._log_in(client)
            while client.recv(65536):
                pass  # statements: read, never answered
        except OSError:
            pass

    @staticmethod
    def _log_in(client: socket.socket) -> None:
        """Refuse SSL and GSS encryption, then accept the startup message: AuthenticationOk and
        ReadyForQuery, as a trust-auth server does."""
        while True:
            (length,) = struct.unpack("!i", _read(client, 4))
            body = _read(client, length - 4)
            (code,) = struct.unpack("!i", body[:4])
            if code not in (SSL_REQUEST, GSSENC_REQUEST):
                break
            client.sendall(b"N")
        client.sendall(b"R" + struct.pack("!ii", 8, 0) + b"Z" + struct.pack("!i", 5) + b"I")


def _read(client: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = client.recv(n - len(data))
        if not chunk:
            raise OSError("the client left")
        data += chunk
    return data
