"""Request dispatch: lookup, authentication, permission, validation, handler, audit.

This is the one error boundary for requests. A CfmsError becomes its coded response; anything
else becomes a 500 carrying only a log reference. Cancellation always propagates.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Awaitable, Callable

import trio
from trio_websocket import ConnectionClosed

from . import auth, protocol
from .errors import (BadRequest, CfmsError, Forbidden, Unauthorized, disk_error,
                     internal_error)
from .permissions import Principal
from .schema import Field, validate
from .storage import accounts

if TYPE_CHECKING:
    from .app import App
    from .connection import Connection

log = logging.getLogger(__name__)

Handler = Callable[["Context", dict], Awaitable[dict]]


@dataclasses.dataclass(frozen=True)
class Route:
    """One row of the routing table."""

    action: str
    handler: Handler
    schema: dict[str, Field] = dataclasses.field(default_factory=dict)
    permission: str | None = None
    anonymous: bool = False
    audited: bool = False  # state-changing actions write an audit entry


@dataclasses.dataclass
class Context:
    """What a handler gets besides its validated data."""

    app: "App"
    conn: "Connection"
    request: protocol.Request
    principal: Principal | None
    audit_target: str | None = None
    # Whom the audit entry names when nobody is authenticated (login: the account tried).
    audit_actor: str | None = None

    @property
    def user(self) -> Principal:
        assert self.principal is not None
        return self.principal

    def require(self, permission: str) -> None:
        if self.principal is None or not self.principal.has(permission):
            raise Forbidden(f"permission '{permission}' required")


class Dispatcher:
    def __init__(self, app: "App", routes: list[Route]):
        self.app = app
        self.routes = {route.action: route for route in routes}
        if len(self.routes) != len(routes):
            raise ValueError("duplicate action in routing table")

    async def handle_text(self, conn: "Connection", text: str) -> dict:
        """Turn one text message into its response envelope."""
        request = None
        try:
            conn.check_text_size(text)
            try:
                request = protocol.parse_request(text)
            except BadRequest as err:
                request = getattr(err, "request", None)
                raise
            return await self._dispatch(conn, request)
        except CfmsError as err:
            return protocol.error_response(err, request)
        except (trio.Cancelled, ConnectionClosed):
            raise
        except Exception as exc:
            doing = f"handling {request.action!r}" if request else "reading a message"
            # A full disk anywhere is a 507 the client can act on; anything else a bare 500.
            error = (disk_error(log, exc, doing) if isinstance(exc, OSError)
                     else internal_error(log, doing, exc))
            return protocol.error_response(error, request)

    async def _authenticate(self, request: protocol.Request) -> Principal:
        if not request.username or not request.token:
            raise Unauthorized("authentication required: send 'username' and 'token'")
        principal = await self.app.store.read(
            accounts.authenticate, request.username, auth.token_hash(request.token),
            self.app.now())
        if principal is None:
            raise Unauthorized("invalid or expired token")
        return principal

    async def _dispatch(self, conn: "Connection", request: protocol.Request) -> dict:
        route = self.routes.get(request.action)
        if route is None:
            raise BadRequest(f"unknown action '{request.action}'")
        principal = None if route.anonymous else await self._authenticate(request)
        if principal is not None:
            conn.authenticated()
        ctx = Context(self.app, conn, request, principal)
        code = 500
        try:
            if route.permission is not None:
                ctx.require(route.permission)
            data = validate(request.data, route.schema)
            result = await route.handler(ctx, data)
            code = 200
            return protocol.success(result, request)
        except CfmsError as err:
            code = err.code
            raise
        finally:
            # Failures are audited too (a wrong password is a 401 from the handler): the log
            # shows what was attempted, not only what succeeded.
            if route.audited:
                await self._audit(ctx, route, code)

    async def _audit(self, ctx: Context, route: Route, code: int) -> None:
        username = ctx.principal.username if ctx.principal else ctx.audit_actor
        target = ctx.audit_target
        with trio.CancelScope(shield=True):
            try:
                await self.app.store.write(
                    accounts.add_audit, self.app.now(), username, route.action, target, code,
                    ctx.conn.address)
            except Exception:
                log.exception("could not write audit entry for %s", route.action)

