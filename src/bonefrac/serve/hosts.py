"""Which Host names the server answers, and the headers every answer carries.

    HostGuard(app, allowed)    400 for a Host header not in `allowed`; X-Content-Type-Options: nosniff on every answer
    allowed_hosts(bound, extra)  what `bonefrac serve` allows: the bound host, localhost, 127.0.0.1, ::1, and `extra`

Why the Host header matters on a server bound to 127.0.0.1: DNS rebinding. A web page on evil.example makes its own
name resolve to 127.0.0.1, and the browser, thinking it talks to evil.example, sends the page's requests (and reads
the answers) to this server. The Host header still says evil.example, so refusing unknown hosts stops it.
nosniff: a browser must take an answer's Content-Type as given, never guess HTML from an upload's bytes.

Written as plain ASGI rather than Starlette's TrustedHostMiddleware, whose `host:port` split drops an IPv6 host
("[::1]:8000" becomes "[") and which sets no header.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
ANY_HOST = "*"
NOSNIFF = (("x-content-type-options", "nosniff"),)  # on every answer, errors included


def allowed_hosts(bound: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The Host names `bonefrac serve --host bound` answers: bound, the loopback names, and `extra` (--allowed-host).

    Bound to every interface (0.0.0.0, ::), the machine's own name and addresses are added too: those are what
    clients on the network type. "*" in `extra` allows any host (behind a proxy that checks it).
    """
    hosts = [bound, *LOOPBACK_HOSTS, *extra]
    if bound in WILDCARD_BINDS:
        name = socket.gethostname()
        hosts += [name, socket.getfqdn()]
        try:
            hosts += [str(info[4][0]) for info in socket.getaddrinfo(name, None)]
        except OSError:  # a host name that does not resolve: the operator adds addresses with --allowed-host
            pass
    return tuple(dict.fromkeys(host.strip("[]").lower() for host in hosts if host not in WILDCARD_BINDS))


def host_of(header: str) -> str:
    """The host name of a Host header, without the port; an IPv6 address without its brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostGuard:
    """Refuse a request whose Host is not allowed (400), and add X-Content-Type-Options: nosniff to every answer.

    allowed: host names as `allowed_hosts` gives them; None (create_app's default, for tests and embedding) checks
    no host but still adds the header.
    """

    def __init__(self, app: ASGIApp, allowed: Iterable[str] | None):
        self.app = app
        self.allowed = None if allowed is None or ANY_HOST in allowed else frozenset(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (the app has no websockets)
            await self.app(scope, receive, send)
            return

        async def send_with_nosniff(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-content-type-options"]
                message = {**message, "headers": [*headers, *((k.encode(), v.encode()) for k, v in NOSNIFF)]}
            await send(message)

        if self.allowed is not None:
            header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_of(header) not in self.allowed:
                # The name is not echoed: the answer says what to do, not what was sent.
                response = JSONResponse({"detail": "this server does not answer to that host name; start it with "
                                                   "--allowed-host NAME to allow one"}, status_code=400)
                await response(scope, receive, send_with_nosniff)
                return
        await self.app(scope, receive, send_with_nosniff)
