"""What the gateway's config readers share: the one error they raise, and JSON Schema building blocks."""

from __future__ import annotations

from typing import Any


class ConfigError(Exception):
    """A config the gateway cannot run with; the message names the key path first, for the person editing the file."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def schema_object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A mapping with exactly these keys: any other key is an error (a typo must not be ignored)."""
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


DURATION = {"type": "number", "exclusiveMinimum": 0}
PERCENT = {"type": "number", "minimum": 0, "maximum": 100}
THRESHOLD = {"type": "integer", "minimum": 1}
STRING = {"type": "string", "minLength": 1}
