"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with their HTTP status."""

from __future__ import annotations

from pydantic import ValidationError
from starlette.responses import JSONResponse

from ingot.server.protocol import ErrorBody, ErrorResponse


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def body(self) -> dict:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


def unsupported(field: str) -> APIError:
    return APIError(400, f"'{field}' is not supported by this server yet", param=field, code="unsupported_parameter")


# Pydantic names the member of a union it tried in an error's location ("str", "list[...]"); a client
# wants the field's path, so those parts are dropped.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "literal"}


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or any(c in part for c in "[],'-"):
            continue
        else:
            out += f".{part}" if out else part
    return out


def invalid_request(e: ValidationError) -> APIError:
    """The first validation error, naming its field."""
    err = e.errors(include_url=False)[0]
    param = _param(err["loc"])
    if err["type"] == "missing":
        message = f"'{param}' is a required field"
    elif param:
        message = f"invalid value for '{param}': {err['msg']}"
    else:
        message = f"invalid request body: {err['msg']}"
    return APIError(400, message, param=param or None, code="invalid_value" if err["type"] != "missing" else None)
