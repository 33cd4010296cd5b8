"""The OpenAPI schema as clients (and schemathesis) should read it.

FastAPI describes a multipart form field as if it were JSON. Two things cannot be sent that way: `null` (an
optional field is simply left out) and an empty list of files (no part at all, which is a missing field). So
optional fields lose their null branch and required lists of files get `minItems: 1`. With API keys, every
operation but the probes names the bearer scheme.
"""

from __future__ import annotations

from fastapi import FastAPI

from app.auth import OPEN_PATHS


def _without_null(field: dict) -> dict:
    branches = [branch for branch in field.get("anyOf", []) if branch != {"type": "null"}]
    if not branches or len(branches) == len(field["anyOf"]):
        return field
    rest = {key: value for key, value in field.items() if key not in ("anyOf", "default")}
    return {**rest, **branches[0]} if len(branches) == 1 else {**rest, "anyOf": branches}


def _tidy_form(body: dict) -> None:
    properties = body.get("properties", {})
    for name, field in properties.items():
        properties[name] = field = _without_null(field)
        if name in body.get("required", []) and field.get("type") == "array":
            field["minItems"] = max(1, field.get("minItems", 0))


def customize_openapi(app: FastAPI, api_keys: bool) -> None:
    build = app.openapi

    def openapi() -> dict:
        schema = build()  # cached by FastAPI after the first call; the changes below are idempotent
        forms = set()
        for operations in schema["paths"].values():
            for operation in operations.values():
                content = operation.get("requestBody", {}).get("content", {})
                if ref := content.get("multipart/form-data", {}).get("schema", {}).get("$ref"):
                    forms.add(ref.rsplit("/", 1)[-1])
        for name in forms:
            _tidy_form(schema["components"]["schemas"][name])
        if api_keys:
            schema["components"].setdefault("securitySchemes", {})["apiKey"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "one of the server's API keys (WILDPDIFF_API_KEYS / WILDPDIFF_API_KEYS_FILE)",
            }
            for path, operations in schema["paths"].items():
                if path not in OPEN_PATHS:
                    for operation in operations.values():
                        operation["security"] = [{"apiKey": []}]
        return schema

    app.openapi = openapi
