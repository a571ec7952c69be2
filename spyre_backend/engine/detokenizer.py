"""Incremental detokenizer: turns a growing token list into text deltas.

Byte-level BPE tokens can end in the middle of a UTF-8 character; decoding such a prefix gives
U+FFFD. A delta is released only once the text decoded so far no longer ends in U+FFFD, so a
character split across tokens is emitted whole, in the step that completes it.
"""

from __future__ import annotations

# Decode a small window of earlier tokens with the new ones: some tokenizers change how a token
# renders depending on its left neighbour (leading spaces), so decoding new tokens alone is wrong.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0  # tokens before this have been emitted as text
        self.text = ""

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token and return the newly completed text (possibly empty)."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self.read_offset = len(self.tokens)
        self.prefix_offset = max(0, self.read_offset - CONTEXT_TOKENS)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a sequence, release whatever is still held back (even if incomplete)."""
        full = self._decode(self.tokens)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        self.read_offset = len(self.tokens)
        return delta
