"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

nv-ingest never reads the body (the status code is the whole message), but the `openai` client and
people with curl do, so every path that can fail answers in this one shape.
"""

from __future__ import annotations

import logging
import pickle
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}


def shown(value: object, limit: int = 100) -> str:
    """A client's value as an error message may quote it: at most `limit` characters, then an ellipsis."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


class ImageError(ValueError):
    """An image that cannot be used; the message is safe to show to the client (400 invalid_image)."""


class APIError(Exception):
    """An error answered to the client; safe to pickle across LitServe's worker processes."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or _default_code(status)
        self.headers = headers or {}

    def __reduce__(self):
        return (APIError, (self.status, self.message, self.param, self.code, self.headers))

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _default_code(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def from_worker(data) -> APIError:
    """Turn what an inference worker reported as an error into an APIError.

    LitServe sends pickled exceptions, HTTPException objects, or None when its monitor gives up a
    request whose worker died.
    """
    if isinstance(data, bytes):
        try:
            data = pickle.loads(data)
        except Exception:  # noqa: BLE001 - an unreadable error is still an error
            data = None
    if isinstance(data, APIError):
        return data
    if isinstance(data, StarletteHTTPException):
        return APIError(data.status_code, str(data.detail))
    if data is None:
        return APIError(503, "The inference worker stopped before answering; retry the request.",
                        code="worker_unavailable")
    logger.error("inference failed: %r", data)
    return APIError(500, "Inference failed inside the model worker.", code="internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str | None]:
    errors = exc.errors()
    if not errors:
        return 422, "Invalid request.", None
    if errors[0].get("type") == "json_invalid":
        return 400, "Request body is not valid JSON.", None
    # Of the alternatives a union tried, the one that got furthest says most about what is wrong.
    first = max(errors, key=lambda e: len(_field_path(e.get("loc", ()))))
    param = ".".join(_field_path(first.get("loc", ()))) or None
    # Only pydantic's message and the field path: never the input, which may be a base64 image.
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    where = f"'{param}': " if param else ""
    return 422, f"Invalid request: {where}{msg}{more}", param


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "list", "dict"}


def _field_path(loc) -> list[str]:
    """The fields of a pydantic error location, without the labels it adds for union alternatives
    (`str`, `list[...]`, model names) and for tagged-union tags (`image_url` before `image_url`)."""
    path: list[str] = []
    for part in (str(p) for p in loc if p != "body"):
        if part in _TYPE_NAMES or "[" in part or part[:1].isupper():
            continue
        if path and path[-1] == part and not part.isdigit():
            continue
        path.append(part)
    return path


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        status, message, param = _validation_message(exc)
        return APIError(status, message, param=param,
                        code="invalid_json" if status == 400 else "invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return APIError(exc.status_code, detail, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        logger.exception("unhandled error")
        return APIError(500, "Internal server error.", code="internal_error").response()
