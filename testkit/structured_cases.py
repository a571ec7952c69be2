"""Schemas, regexes and choices the structured-output tests sample under (engine and server).

Every schema bounds its values (string lengths, number ranges, array sizes), so each one's
compact instances end within a bounded number of tokens: a sampled output may never be cut short.
"""

from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 12}
SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 99}

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"]},
    "enum": {"type": "string", "enum": ["red", "green", "blue", "light grey"]},
    "int_array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                  "minItems": 1, "maxItems": 4},
    "invoice": {"type": "object", "properties": {
        "invoice": {"type": "object", "properties": {
            "number": {"type": "string", "pattern": "^INV-[0-9]{3}$"},
            "total": {"type": "number", "minimum": 0, "maximum": 1000}}, "required": ["number", "total"]},
        "paid": {"type": "boolean"}}, "required": ["invoice", "paid"]},
    "any_of": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "integer", "minimum": 0, "maximum": 9}]},
    "optional_fields": {"type": "object", "properties": {"a": SMALL_INT, "b": {"type": "boolean"}, "c": NAME},
                        "required": ["a"]},
    "const": {"type": "object", "properties": {"kind": {"const": "invoice"}, "n": SMALL_INT},
              "required": ["kind", "n"]},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "unit_interval": {"type": "number", "minimum": -1, "maximum": 1},
    "code_pattern": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
    "array_of_objects": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"id": SMALL_INT, "tag": {"enum": ["a", "b", "c"]}},
        "required": ["id", "tag"]}},
    "tuple": {"type": "array", "prefixItems": [{"type": "string", "maxLength": 3}, SMALL_INT], "items": False},
    "refs": {"$defs": {"point": {"type": "object", "properties": {"x": SMALL_INT, "y": SMALL_INT},
                                 "required": ["x", "y"]}},
             "type": "object", "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
             "required": ["from", "to"]},
    "mixed_enum": {"enum": [1, "two", None, True, 3.5]},
    "string_bounds": {"type": "string", "minLength": 2, "maxLength": 6},
    "nested_arrays": {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 2,
                                                                 "items": {"type": "boolean"}}},
    "exclusive_range": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
    "closed_object": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 4}},
                      "additionalProperties": False, "required": ["q"]},
    "nullable": {"type": "object", "properties": {"v": {"anyOf": [SMALL_INT, {"type": "null"}]}},
                 "required": ["v"]},
    "deep": {"type": "object", "properties": {"l1": {"type": "object", "properties": {"l2": {
        "type": "object", "properties": {"l3": {"type": "array", "maxItems": 2, "items": SMALL_INT}},
        "required": ["l3"]}}, "required": ["l2"]}}, "required": ["l1"]},
    "two_of_three": {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"},
                                                      "c": {"type": "boolean"}}, "minProperties": 2, "maxProperties": 2},
    "described": {"title": "Line", "description": "one invoice line", "type": "object", "properties": {
        "item": {"type": "string", "maxLength": 8, "description": "what"}, "qty": SMALL_INT},
        "required": ["item", "qty"]},
}

REGEXES = [r"[a-z]{1,8}@[a-z]{2,5}\.(com|org)", r"(yes|no|maybe)", r"[0-9]{3}-[0-9]{4}", r"[A-Z][a-z ]{0,10}\."]
CHOICES = [["yes", "no"], ["a green triangle", "a red circle", "a blue square"], ["x\"y", "new\nline", "é"]]
