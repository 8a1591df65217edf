"""The one error type for bad client input. The HTTP layer maps it to 400 with `param`."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request parameter is invalid. `param` names it (e.g. "control.weights.happy")."""

    def __init__(self, param: str, message: str, status_code: int = 400, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.message = message
        self.status_code = status_code
        self.code = code

    def __str__(self) -> str:
        return f"{self.param}: {self.message}"


def reward_failed(error: Exception) -> InvalidRequestError:
    """A reward the request named failed (timeout, error, bad scores): that request alone ends
    with HTTP 502 naming the reward."""
    name = getattr(error, "reward", "?")
    return InvalidRequestError(f"control.rewards.{name}", str(error), status_code=502,
                               code="reward_failed")
