"""Tool calling on the OpenAI front, the way Granite writes it: the tools go into the prompt
through the checkpoint's chat template (``tools=``, as ``apply_chat_template`` does), and the
model answers a call as ``<|tool_call|>`` followed by a JSON list of ``{"name", "arguments"}``.

- ``tool_choice: "auto"`` (the default with tools): the model is free; an answer that is a
  well-formed call list of known tools becomes ``tool_calls``, anything else stays text;
- ``"required"`` or a named function: the prompt ends with ``<|tool_call|>`` and a JSON schema
  grammar (structured output in granite_llm) holds the answer to a list of calls of those tools
  whose arguments follow their parameters, so the call always parses;
- ``"none"``: the tools are in the prompt, the answer is text.

A call answers with ``finish_reason: "tool_calls"``, each call with an id of its own; streamed,
a forced call goes out as it is written, an ``auto`` one whole once the answer parses.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from spyre_backend.engine.sampling_params import SamplingParams
from spyre_backend.errors import InvalidRequest

TOOL_CALL = "<|tool_call|>"  # Granite's marker before a JSON list of calls
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class Tools:
    """The tools of a request and how the answer may use them."""

    functions: dict[str, dict]  # name -> parameters (a JSON schema)
    definitions: list[dict]  # as the chat template gets them: [{"type": "function", "function": {...}}]
    choice: str = "auto"  # auto | none | required | named
    named: str | None = None  # the function tool_choice names
    parallel: bool = True  # parallel_tool_calls: more than one call per answer

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    def structured_outputs(self) -> dict:
        """The grammar of a forced answer: a list of calls (one, without parallel calls)."""
        names = [self.named] if self.choice == "named" else list(self.functions)
        calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": self.functions[name]},
                  "required": ["name", "arguments"]} for name in names]
        schema: dict = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        return {"json": schema}


def parse_tools(body: dict) -> Tools | None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat body (None: no tools)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools")
        return None
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list of {'type': 'function', 'function': {...}}")
    functions, definitions = {}, []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict):
            raise InvalidRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequest(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in functions:
            raise InvalidRequest(f"tools[{i}]: the function name {name!r} is given twice")
        parameters = function.get("parameters", EMPTY_PARAMETERS)
        try:  # checked as a response_format schema is (the forced grammar compiles it)
            SamplingParams(structured_outputs={"json": parameters}).validate()
        except InvalidRequest as exc:
            raise InvalidRequest(f"tools[{i}].function.parameters: {exc}") from None
        functions[name] = parameters
        definitions.append({"type": "function", "function": {
            key: function[key] for key in ("name", "description", "parameters") if key in function}})
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise InvalidRequest(f"parallel_tool_calls must be a boolean, got {parallel!r}")
    result = Tools(functions, definitions, parallel=parallel)
    if choice in (None, "auto", "none", "required"):
        result.choice = choice or "auto"
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise InvalidRequest(f"tool_choice names the function {name!r}, which is not in tools {list(functions)}")
        result.choice, result.named = "named", name
    else:
        raise InvalidRequest("tool_choice must be 'auto', 'none', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
    return result


def template_message(message: dict, where: str) -> dict:
    """The extra fields of an assistant's earlier calls and of a tool's answer, for the template
    (HF's form: call arguments as objects)."""
    out = {}
    if message.get("role") == "assistant" and message.get("tool_calls"):
        calls = message["tool_calls"]
        if not isinstance(calls, list):
            raise InvalidRequest(f"{where}.tool_calls must be a list")
        out["tool_calls"] = []
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise InvalidRequest(f"{where}.tool_calls[{j}] must have function.name")
            arguments = function.get("arguments", "{}")
            try:
                arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"{where}.tool_calls[{j}].function.arguments is not valid JSON: {exc}") from None
            out["tool_calls"].append({"type": "function", "function": {"name": function["name"],
                                                                      "arguments": arguments}})
    if message.get("role") == "tool" and message.get("tool_call_id") is not None:
        out["tool_call_id"] = message["tool_call_id"]
    return out


def parse_calls(text: str, tools: Tools) -> list[dict] | None:
    """The calls in an answer (``<|tool_call|>`` then a JSON list of known functions), in OpenAI's
    shape with ids; None if the answer is not a well-formed call list. The marker may be missing:
    a forced answer's is in the prompt, and where the tokenizer makes it a special token the
    detokenized text leaves it out."""
    body = text.strip()
    body = body[len(TOOL_CALL):] if body.startswith(TOOL_CALL) else body
    try:
        calls = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for call in calls:
        if not (isinstance(call, dict) and call.get("name") in tools.functions
                and isinstance(call.get("arguments", {}), dict)):
            return None
        out.append({"id": new_call_id(), "type": "function",
                    "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}),
                                                                               ensure_ascii=False)}})
    return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


_CALL_HEAD = re.compile(r'[\[,]\{"name":"([^"\\]*)","arguments":')  # as a forced answer's grammar writes it


class ForcedCallScanner:
    """Streams a forced answer's calls as they are written. Its grammar writes them compact, the
    name first (the order of the schema's properties): ``[{"name":"f","arguments":{...}},...]``,
    so each call's header goes out once its name is complete, then its arguments as they come."""

    def __init__(self):
        self.text, self.pos, self.index = "", 0, -1
        self.in_arguments = self.in_string = self.escaped = False
        self.depth = 0

    def feed(self, chunk: str) -> list[dict]:
        """The ``delta.tool_calls`` entries that ``chunk`` completes."""
        self.text += chunk
        deltas = []
        while self.pos < len(self.text):
            if not self.in_arguments:
                head = _CALL_HEAD.match(self.text, self.pos)
                if head is None:  # a head not complete yet, or the list's end
                    break
                self.index, self.pos, self.in_arguments = self.index + 1, head.end(), True
                deltas.append({"index": self.index, "id": new_call_id(), "type": "function",
                               "function": {"name": head.group(1), "arguments": ""}})
                continue
            start = self.pos
            ended = self._scan_arguments()
            if self.pos > start:
                deltas.append({"index": self.index, "function": {"arguments": self.text[start:self.pos]}})
            if not ended:
                break
            self.in_arguments, self.pos = False, self.pos + 1  # past the call's closing brace
        return deltas

    def _scan_arguments(self) -> bool:
        """Advance over the arguments' JSON; True at the brace that closes the call."""
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "[{":
                self.depth += 1
            elif char in "]}":
                if self.depth == 0:
                    return True
                self.depth -= 1
            self.pos += 1
        return False


@dataclass
class ToolCallStream:
    """One choice's streamed answer where a call may come. A forced answer streams its calls as
    they are written (``ForcedCallScanner``); with ``auto``, text that could still be the start of
    a call is held back, and at the end the held text is a call list or is released as text."""

    tools: Tools
    held: list[str] = field(default_factory=list)
    releasing: bool = False  # the answer is text: pass it on as it comes
    scanner: ForcedCallScanner | None = None

    def __post_init__(self):
        if self.tools.forced:
            self.scanner = ForcedCallScanner()

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """The text and the tool-call deltas to stream now."""
        if self.scanner is not None:
            return "", self.scanner.feed(text)
        if self.releasing or self.tools.choice == "none":
            return text, []
        self.held.append(text)
        held = "".join(self.held)
        start = held.lstrip()
        if TOOL_CALL.startswith(start) or start.startswith((TOOL_CALL, "[")):
            return "", []  # (a list may be a call whose marker the detokenizer left out)
        self.releasing, self.held = True, []
        return held, []

    def finish(self, finish_reason: str) -> tuple[str, list[dict], str]:
        """(text still to send, tool-call deltas still to send, the finish reason to report)."""
        if self.scanner is not None:
            if self.scanner.index < 0:  # no call began (a stop string cut it): the text as it is
                return self.scanner.text, [], finish_reason
            return "", [], "tool_calls" if finish_reason == "stop" else finish_reason
        held, self.held = "".join(self.held), []
        if self.releasing or self.tools.choice == "none":
            return held, [], finish_reason
        calls = parse_calls(held, self.tools) if finish_reason == "stop" else None
        if calls is None:
            return held, [], finish_reason
        return "", [{"index": k, **call} for k, call in enumerate(calls)], "tool_calls"


def assistant_message(tools: Tools | None, text: str, finish_reason: str) -> tuple[dict, str]:
    """A whole answer as OpenAI's assistant message, and the finish reason to report."""
    calls = None
    if tools is not None and tools.choice != "none" and finish_reason == "stop":
        calls = parse_calls(text, tools)
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": text}, finish_reason
