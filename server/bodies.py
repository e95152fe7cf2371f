"""Request bodies as LibreTranslate's clients send them: JSON, form-urlencoded or multipart form data.

LibreTranslate reads a JSON object when the body is JSON and the form (plus the query string) otherwise: its
own Python client posts form-urlencoded bodies and its web page multipart forms. `read_fields` turns any of
the three into one dict of fields (a form field given more than once becomes a list, so a form can carry a
list `q` too), and `parse_fields` validates that dict with a pydantic schema, naming the field that is wrong.
Either raises `RequestError` (400), never a 5xx.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from server.engine import RequestError

JSON, FORM, MULTIPART = "application/json", "application/x-www-form-urlencoded", "multipart/form-data"
BODY_TYPES = (JSON, FORM, MULTIPART)
MAX_FORM_FIELDS = 1000  # python-multipart's guard against field floods

Schema = TypeVar("Schema", bound=BaseModel)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_fields(request: Request) -> dict[str, Any]:
    """The body's fields by its content type; a body with no content type is read as JSON when it has one."""
    kind = media_type(request)
    if kind in (FORM, MULTIPART):
        try:
            form = await request.form(max_fields=MAX_FORM_FIELDS)
        except Exception as error:  # python-multipart's parse errors have no common base class
            raise RequestError(f"malformed form body: {error}", 400) from None
        fields: dict[str, Any] = {}
        for key in form:
            values = form.getlist(key)
            fields[key] = values if len(values) > 1 else values[0]
        return fields
    if kind and kind != JSON and not kind.endswith("+json"):
        raise RequestError(f"unsupported content type {kind!r}: send {', '.join(BODY_TYPES)}", 415)
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(f"malformed JSON body: {error}", 400) from None
    if not isinstance(data, dict):
        raise RequestError("the JSON body must be an object", 400)
    return data


BodyFields = Annotated[dict[str, Any], Depends(read_fields)]  # an endpoint's parameter: the parsed body


def parse_fields(schema: type[Schema], fields: dict[str, Any]) -> Schema:
    """`fields` as `schema`; a RequestError naming each wrong field otherwise. Uploaded files are not fields."""
    values = {k: v for k, v in fields.items() if not isinstance(v, UploadFile)}
    try:
        return schema.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors())
        raise RequestError(f"invalid request: {problems}", 400) from None


def openapi_body(schema: type[BaseModel], name: str, files: dict[str, str] | None = None) -> dict[str, Any]:
    """`openapi_extra` documenting a body accepted as JSON, urlencoded and multipart form (with `files`: field
    name -> description, multipart only)."""
    ref = {"$ref": f"#/components/schemas/{name}"}
    if files:
        upload = {"type": "object", "required": list(files), "properties": {
            field: {"type": "string", "format": "binary", "description": text} for field, text in files.items()}}
        return {"requestBody": {"required": True, "content": {MULTIPART: {"schema": {"allOf": [ref, upload]}}}}}
    return {"requestBody": {"required": True, "content": {kind: {"schema": ref} for kind in BODY_TYPES}}}
