"""The tiny checkpoint's tokenizer: byte-level BPE trained on the synthetic data, Granite's special
tokens and a granite-vision-3.2 style chat template."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from . import synthetic

EOS = "<|end_of_text|>"
IMAGE_TOKEN = "<image>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# <|end_of_text|> is id 0 like in Granite (bos = eos = pad = 0).
SPECIAL_TOKENS = [EOS, *ROLE_TOKENS, IMAGE_TOKEN]
TOKENIZER_VOCAB = 512

SYSTEM_PROMPT = (
    "A chat between a curious user and a tiny vision assistant. "
    "The assistant answers questions about simple pictures briefly."
)

# granite-vision-3.2 style: "<|system|>\n...\n<|user|>\n<image>\nquestion\n<|assistant|>\n".
# Content may be a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts;
# each image part becomes "<image>\n" (so images given before the question sit on their own
# lines), text parts are copied verbatim. Assistant turns end with <|end_of_text|>.
# Tools (apply_chat_template(..., tools=...)), as Granite writes them: the list after the system
# turn ("<|available_tools|>\n" + JSON), an assistant's calls as "<|tool_call|>" + a JSON list of
# {"name", "arguments"}, and a tool's answer as a "<|tool_response|>\n" turn.
CHAT_TEMPLATE = """\
{%- macro render(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content -%}
        {%- for part in content -%}
            {%- if part['type'] in ['image', 'image_url'] -%}
                {{- '<image>\\n' -}}
            {%- elif part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- macro available_tools() -%}
    {%- if tools -%}
        {{- '<|available_tools|>\\n' + tools | tojson + '\\n' -}}
    {%- endif -%}
{%- endmacro -%}
{%- if not messages or messages[0]['role'] != 'system' -%}
    {{- '<|system|>\\n' + default_system_prompt + '\\n' -}}
    {{- available_tools() -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {{- '<|system|>\\n' + render(message['content']) + '\\n' -}}
        {%- if loop.first -%}
            {{- available_tools() -}}
        {%- endif -%}
    {%- elif message['role'] == 'user' -%}
        {{- '<|user|>\\n' + render(message['content']) + '\\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<|assistant|>\\n' + render(message['content']) -}}
        {%- if message['tool_calls'] -%}
            {{- '<|tool_call|>' + message['tool_calls'] | map(attribute='function') | list | tojson -}}
        {%- endif -%}
        {{- eos_token + '\\n' -}}
    {%- elif message['role'] == 'tool' -%}
        {{- '<|tool_response|>\\n' + render(message['content']) + '\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>\\n' -}}
{%- endif -%}
""".replace("default_system_prompt", repr(SYSTEM_PROMPT))

def build_tokenizer(image_token_id: int | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on every string the synthetic data can produce.

    ``image_token_id``: put ``<image>`` at that id instead of right after the other special
    tokens, the vocabulary between padded with tokens no text encodes to (the published
    granite-vision tokenizer has 49155 entries and ``<image>`` at 49155)."""
    bpe = Tokenizer(models.BPE())
    # No prefix space: the answer is tokenized on its own after "<|assistant|>\n", and must
    # split exactly as the model will generate it.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS if image_token_id is None else [t for t in SPECIAL_TOKENS if t != IMAGE_TOKEN]
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(synthetic.corpus(SYSTEM_PROMPT) + _filler_text(), trainer)
    if image_token_id is not None:
        bpe = _padded(bpe, image_token_id)
        bpe.add_special_tokens([IMAGE_TOKEN])
    for token in SPECIAL_TOKENS:
        wanted = SPECIAL_TOKENS.index(token) if token != IMAGE_TOKEN or image_token_id is None else image_token_id
        assert bpe.token_to_id(token) == wanted, (token, bpe.token_to_id(token))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="left",  # for batched generation, as Granite's tokenizer
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def _padded(bpe: Tokenizer, size: int) -> Tokenizer:
    """The same BPE with its vocabulary filled up to ``size`` entries by tokens that no merge
    produces (so no text encodes to them; the model may still generate them)."""
    spec = json.loads(bpe.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), size):
        vocab[f"<|unused_{i}|>"] = i
    return Tokenizer.from_str(json.dumps(spec))


def _filler_text() -> list[str]:
    # A little general text so the BPE reaches its vocab size and everyday words in served
    # prompts do not all fall back to single bytes.
    words = (
        "the a an is are was of to in on at for with and or not this that it what which who how why "
        "where when image picture photo shape color colour background left right top bottom big small "
        "large tiny one two three four five six seven eight nine ten yes no please thank you "
        "hello describe show tell name count there here"
    ).split()
    return [" ".join(words)] + [f"{i} + {j} = {i + j}" for i in range(10) for j in range(10)]