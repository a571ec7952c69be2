"""What a request asks its output to be: a JSON schema, any JSON object, a regex, one of some
choices or an EBNF grammar, read from every form the APIs accept, and checked before anything is
compiled. Pure Python (no torch, no xgrammar): the OpenAI front checks requests with it too.

The forms, in ``sampling_parameters`` (and on the OpenAI front, in the request body):
- vLLM's ``structured_outputs``: ``{"json": schema}``, ``{"json_object": true}``, ``{"regex": ...}``,
  ``{"choice": [...]}`` or ``{"grammar": ebnf}``, exactly one;
- vLLM's older ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``;
- OpenAI's ``response_format``: ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}`` (or ``{"type": "text"}``: no constraint).

Each becomes a ``StructuredOutput(kind, spec)`` whose ``spec`` is canonical text (a schema
without whitespace, its keys in their order: the order of ``properties`` is the order the fields
are written in), so the same constraint written twice compiles once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from spyre_backend.errors import InvalidRequest

KINDS = ("json", "json_object", "regex", "choice", "grammar")
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
FORMS = ("structured_outputs", "response_format", *GUIDED)  # the request fields that carry one

# JSON-schema keywords the grammar enforces (xgrammar's converter), and those that only annotate.
# Anything else is refused by name: a keyword the grammar would silently drop (``multipleOf``,
# ``uniqueItems``, ``not``, ``if``; xgrammar 0.2.8 drops ``allOf`` and reads ``oneOf`` as ``anyOf``)
# gives output that the schema rejects.
ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
            "maxItems", "enum", "const", "anyOf", "$ref", "$defs", "definitions",
            "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern",
            "minProperties", "maxProperties"}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly"}
SUPPORTED_KEYWORDS = ENFORCED | ANNOTATIONS
_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # {name: subschema}
_SCHEMA_LISTS = ("anyOf", "prefixItems")  # [subschema]


@dataclass(frozen=True)
class StructuredOutput:
    kind: str  # one of KINDS
    spec: str  # canonical text: the schema (compact), the regex, the choices (JSON), the grammar

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.spec


def canonical_json(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def forms_to_structured_outputs(name: str, value) -> dict | None:
    """One form, as vLLM's ``structured_outputs`` object (None: response_format text)."""
    if name in GUIDED:
        return {GUIDED[name]: value}
    if name == "structured_outputs":
        if not isinstance(value, dict):
            raise InvalidRequest(f"structured_outputs must be an object with one of {list(KINDS)}")
        return value
    # response_format
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
            raise InvalidRequest("response_format json_schema needs json_schema.schema, a JSON schema object")
        if "name" in inner and not isinstance(inner["name"], str):
            raise InvalidRequest("response_format json_schema.name must be a string")
        if "strict" in inner and not isinstance(inner["strict"], (bool, type(None))):
            raise InvalidRequest("response_format json_schema.strict must be a boolean")
        return {"json": inner["schema"]}
    raise InvalidRequest(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def structured_from(values: dict) -> dict | None:
    """Remove every structured-output form from ``values`` (a sampling_parameters object) and
    return it as one vLLM ``structured_outputs`` object (None: none was given)."""
    given = [name for name in FORMS if values.get(name) is not None]
    raw = {name: values.pop(name, None) for name in FORMS}
    if len(given) > 1:
        raise InvalidRequest(f"give at most one structured output form, got {given}")
    return forms_to_structured_outputs(given[0], raw[given[0]]) if given else None


def parse(outputs: dict, *, max_bytes: int, max_depth: int) -> StructuredOutput:
    """A ``structured_outputs`` object as a checked ``StructuredOutput``; the limits are named
    in every refusal (``max_grammar_bytes``, ``max_schema_depth``)."""
    kinds = [k for k in KINDS if outputs.get(k) not in (None, False)]
    unknown = sorted(set(outputs) - set(KINDS))
    if unknown:
        raise InvalidRequest(f"structured_outputs: unsupported field(s) {unknown}; supported: {list(KINDS)}")
    if len(kinds) != 1:
        raise InvalidRequest(f"structured_outputs needs exactly one of {list(KINDS)}, got {kinds}")
    kind = kinds[0]
    value = outputs[kind]
    if kind == "json_object":
        if value is not True:
            raise InvalidRequest("structured_outputs.json_object must be true")
        return StructuredOutput(kind, "")
    if kind == "json":
        if isinstance(value, str):  # a schema given as JSON text
            _check_size(value, "the JSON schema", max_bytes)
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise InvalidRequest(f"the JSON schema is not valid JSON: {type(exc).__name__}: {exc}") from None
        if not isinstance(value, dict):
            raise InvalidRequest(f"the JSON schema must be an object, got {type(value).__name__}")
        spec = canonical_json(value)
        _check_size(spec, "the JSON schema", max_bytes)
        depth = _depth(value)
        if depth > max_depth:
            raise InvalidRequest(f"the JSON schema is nested {depth} levels deep, over the limit "
                                 f"max_schema_depth={max_depth}")
        check_schema(value)
        return StructuredOutput(kind, spec)
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise InvalidRequest("choice must be a non-empty list of non-empty strings")
        spec = canonical_json(value)
    elif not isinstance(value, str) or not value:
        raise InvalidRequest(f"{kind} must be a non-empty string")
    else:
        spec = value
    _check_size(spec, f"the {kind}", max_bytes)
    return StructuredOutput(kind, spec)


def _check_size(text: str, what: str, max_bytes: int) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidRequest(f"{what} is {size} bytes, over the limit max_grammar_bytes={max_bytes}")


def _depth(value) -> int:
    """Nesting levels of a JSON value (iterative: a deep one cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def check_schema(schema: dict) -> None:
    """Refuse a schema that is not valid JSON Schema (its own metaschema), or that uses a keyword
    the grammar cannot enforce."""
    from jsonschema import exceptions, validators  # only where a schema is checked

    try:
        validators.validator_for(schema, default=validators.Draft202012Validator).check_schema(schema)
    except exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise InvalidRequest(f"invalid JSON schema{f' at /{where}' if where else ''}: {exc.message}") from None
    stack = [(schema, "")]
    while stack:
        node, at = stack.pop()
        if isinstance(node, bool):
            continue
        unsupported = sorted(set(node) - SUPPORTED_KEYWORDS)
        if unsupported:
            raise InvalidRequest(f"unsupported JSON schema keyword(s) {unsupported} at {at or '/'}; supported: "
                                 f"{sorted(ENFORCED)} (and annotations such as title, description)")
        for name in _SCHEMA_MAPS:
            stack.extend((sub, f"{at}/{name}/{key}") for key, sub in node.get(name, {}).items())
        for name in _SCHEMA_LISTS:
            stack.extend((sub, f"{at}/{name}/{i}") for i, sub in enumerate(node.get(name, [])))
        for name in ("items", "additionalProperties"):
            sub = node.get(name)
            if isinstance(sub, list):  # draft 4-7 tuple items
                stack.extend((s, f"{at}/{name}/{i}") for i, s in enumerate(sub))
            elif sub is not None:
                stack.append((sub, f"{at}/{name}"))
