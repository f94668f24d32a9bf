"""The one name for a JSON object as the API and the state store carry it."""

from typing import Any

JsonObject = dict[str, Any]
