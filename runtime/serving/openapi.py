"""The OpenAPI 3.1 description of the service (``/openapi.json``), built from the bundle's
categories and the server's settings: the inspect operation, the operations around it, the
error answers and the two schemas (Error, Result)."""

from __future__ import annotations

from ..core.names import MODES, OLD_LOAD_TIMING, REQUEST_TIMINGS, SCORING_MODES
from .auth import API_KEY_HEADER
from .config import ServeConfig

BINARY = {"type": "string", "format": "binary"}


def error(description: str) -> dict:
    """An error answer: the Error schema as JSON."""
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def security(config: ServeConfig) -> list[dict]:
    return [{"apiKey": []}] if config.api_key else []


def auth_errors(config: ServeConfig) -> dict:
    return {"401": error("API key missing or wrong")} if config.api_key else {}


def inspect_errors(config: ServeConfig) -> dict:
    return {"400": error("the body is not a usable image (not an image, truncated, empty)"),
            "413": error(f"body over {config.max_body_bytes} bytes"),
            "415": error("unsupported content type"),
            "422": error("unknown category, bad mode or parameter"),
            "503": error("queue full or not ready; see Retry-After"),
            **auth_errors(config)}


def inspect_operation(categories: list[str], config: ServeConfig) -> dict:
    """POST /v1/inspect: the parameters (query or multipart fields), the body, the answers."""
    return {
        "summary": "Inspect one image",
        "security": security(config),
        "parameters": [
            {"name": "category", "in": "query", "required": True,
             "description": "product category; one of " + ", ".join(categories)
                            + " (a multipart 'category' field takes precedence)",
             "schema": {"type": "string", "enum": categories}},
            {"name": "mode", "in": "query", "required": False,
             "schema": {"type": "string", "enum": list(MODES)}},
            {"name": "heatmap", "in": "query", "required": False,
             "schema": {"type": "boolean"}},
        ],
        "requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": BINARY},
            "image/png": {"schema": BINARY},
            "image/jpeg": {"schema": BINARY},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {"image": BINARY,
                               "category": {"type": "string", "enum": categories},
                               "mode": {"type": "string", "enum": list(MODES)}}}},
        }},
        "responses": {"200": {"description": "the verdict", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Result"}}}},
            **inspect_errors(config)},
    }


def operations_paths(config: ServeConfig) -> dict:
    """The paths around inspection: liveness, readiness, metrics."""
    return {
        "/healthz": {"get": {"summary": "the process is up", "responses": {
            "200": {"description": "up"}}}},
        "/readyz": {"get": {"summary": "the model is loaded and warmed up", "responses": {
            "200": {"description": "ready"}, "503": error("not ready")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "security": security(config),
                             "responses": {"200": {"description": "text exposition format",
                                                   "content": {"text/plain": {}}},
                                           **auth_errors(config)}}},
    }


def error_schema() -> dict:
    return {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["status", "code", "message"],
        "properties": {"status": {"type": "integer"}, "code": {"type": "string"},
                       "message": {"type": "string"}}}}}


def result_schema() -> dict:
    """The answer of /v1/inspect."""
    number_or_null = {"type": ["number", "null"]}
    return {
        "type": "object",
        "required": ["image_id", "category", "mode", "image_score", "is_anomalous",
                     "threshold", "bundle", "batch_size", "timings_ms"],
        "properties": {
            "image_id": {"type": "string"}, "category": {"type": "string"},
            "mode": {"type": "string", "enum": list(SCORING_MODES)},
            "image_score": {"type": "number"},
            "is_anomalous": {"type": ["boolean", "null"],
                             "description": "null when no threshold is set"},
            "threshold": {"type": ["object", "null"], "properties": {
                "image": {"type": "number"}, "key": {"type": "string"}}},
            "bundle": {"type": "object"},
            "batch_size": {"type": "integer", "minimum": 1},
            "timings_ms": {"type": "object", "properties": {
                k: number_or_null for k in (*REQUEST_TIMINGS, OLD_LOAD_TIMING)}},
            "heatmap_png": {"type": "string", "description": "base64 PNG overlay"},
        }}


def openapi_schema(categories: list[str], config: ServeConfig) -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "clipinspect inspection service", "version": "1"},
        "paths": {"/v1/inspect": {"post": inspect_operation(categories, config)},
                  **operations_paths(config)},
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header",
                                           "name": API_KEY_HEADER}},
            "schemas": {"Error": error_schema(), "Result": result_schema()},
        },
    }
