"""Who may call the API: a bearer token, and a refusal to expose a server without one.

    read_token(token_file, environment)       the token from --token-file, else from BONEFRAC_TOKEN; None when neither
    check_exposure(host, token, insecure)     BonefracError for a non-loopback bind without a token (unless insecure)
    TokenGuard(app, token)                    401 with WWW-Authenticate for an /v1/ request without the right token

Only the /v1/ endpoints (the model and the patients' images) need the token. /health and /ready stay open, so that a
load balancer or an orchestrator can probe the process without a secret; the page, its static files and the
OpenAPI docs stay open too (they hold nothing from the model or a patient), so a browser can load the page that then
asks for the token. The token never comes from the command line (other users see it in `ps`) and is never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from bonefrac.errors import BonefracError

TOKEN_ENVIRONMENT = "BONEFRAC_TOKEN"
PROTECTED_PREFIX = "/v1/"


def read_token(token_file: str | Path | None, environment_value: str | None) -> str | None:
    """The token: the first line of `token_file` when given, else `environment_value` (BONEFRAC_TOKEN); surrounding
    whitespace dropped. An unreadable or empty token file is an error, never a server without a token."""
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise BonefracError(f"--token-file {token_file}: cannot be read ({type(err).__name__})") from None
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not token:
            raise BonefracError(f"--token-file {token_file}: the file is empty")
        return token
    token = (environment_value or "").strip()
    return token or None


def is_loopback(host: str) -> bool:
    """True for a bind address only this machine can reach (localhost, 127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without a token, unless the operator said --insecure."""
    if token is None and not insecure and not is_loopback(host):
        raise BonefracError(
            f"--host {host} lets other machines reach the API: give a token (--token-file FILE or "
            f"{TOKEN_ENVIRONMENT}), or --insecure to serve without one"
        )


class TokenGuard:
    """401 for a request to /v1/ without `Authorization: Bearer <token>`; token None lets every request through.

    The token is compared in constant time (hmac.compare_digest), so the answer's timing does not tell how much of a
    guess was right.
    """

    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.token = None if token is None else token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            reason, challenge = ("this server needs a token: send Authorization: Bearer <token>",
                                 'Bearer realm="bonefrac"')
        elif not hmac.compare_digest(given.strip(), self.token):
            reason, challenge = "the token is not valid", 'Bearer realm="bonefrac", error="invalid_token"'
        else:
            await self.app(scope, receive, send)
            return
        response = JSONResponse({"detail": reason}, status_code=401, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)
