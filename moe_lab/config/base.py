"""What every config schema shares: the error users see, and the checks that raise it."""

from __future__ import annotations

import math

__all__ = ["ConfigError", "choice", "positive_float", "positive_int", "require"]


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, out of range or inconsistent."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def positive_int(value: object, key: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    require(ok, f"{key} must be a positive integer, got {value!r}")


def positive_float(value: object, key: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    require(ok and math.isfinite(value), f"{key} must be a positive finite number, got {value!r}")


def choice(value: object, allowed: tuple[str, ...], key: str) -> None:
    require(value in allowed, f"{key} must be one of {', '.join(allowed)}; got {value!r}")
