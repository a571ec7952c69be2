"""The checkpoint's own chat template, rendered without transformers (which would import torch
into this light process): the Jinja settings HF uses, read from the checkpoint's files.

``tests/test_openai_protocol.py`` checks the rendering against ``processor.apply_chat_template``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<|end_of_text|>", ...} in older tokenizer configs
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def find_template(checkpoint: Path) -> str:
    """Where transformers looks, in its order: chat_template.jinja, chat_template.json, the
    tokenizer config (a string, or a list of named templates of which "default" is used)."""
    jinja = checkpoint / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        template = _read_json(checkpoint / name).get("chat_template")
        if isinstance(template, list):
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            return template
    raise FileNotFoundError(f"{checkpoint} has no chat template (chat_template.jinja or a tokenizer config entry)")


class ChatTemplate:
    def __init__(self, template: str, special_tokens: dict[str, str], image_token: str = "<image>"):
        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        self._template = env.from_string(template)
        self.special_tokens = special_tokens
        self.image_token = image_token

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> "ChatTemplate":
        checkpoint = Path(checkpoint)
        config = _read_json(checkpoint / "tokenizer_config.json")
        tokens = {name: text for name in ("bos_token", "eos_token", "pad_token", "unk_token")
                  if (text := _token_text(config.get(name))) is not None}
        image_token = _token_text(config.get("image_token")) or _read_json(
            checkpoint / "processor_config.json").get("image_token", "<image>")
        return cls(find_template(checkpoint), tokens, image_token)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """Messages whose content is a string or a list of ``{"type": "text"|"image", ...}`` parts;
        ``tools`` as ``apply_chat_template(..., tools=...)`` takes them."""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                     **self.special_tokens)
