"""Grammar-constrained decoding with xgrammar: compiled grammars, one matcher per request, and the
token bitmask of each row that has one.

- Compiling: ``compile`` (any thread) returns a future from a cache keyed by the constraint's
  canonical text (``StructuredOutput.key``); a miss compiles on a thread of its own, never on the
  engine thread, so a compile stalls no other row. The engine core holds a request until its
  grammar is ready (or refuses it when compiling fails or takes longer than
  ``grammar_compile_timeout_s``).
- Matching (engine thread only): a request's matcher is made at its first sampled step, gives the
  bitmask of the tokens allowed next, advances with each sampled token and is released when the
  request ends, whatever ends it (finish, stop, cancel, error). A preempted request keeps its
  matcher: it keeps its output too, and recomputing the sequence's K/V changes neither. A turn
  that ends before computing anything never sampled, so its matcher never moved (the turn
  rollback in ``Turns.end`` needs no grammar rollback).

JSON is compact (``any_whitespace=False``: no free whitespace between tokens, so a schema whose
values are bounded ends within a bounded number of tokens), and xgrammar's strings never hold a
raw control character.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import xgrammar as xgr

from spyre_backend.config import EngineLimits
from spyre_backend.engine.structured_request import StructuredOutput

JSON_SEPARATORS = (",", ":")  # compact, as OpenAI's answers are
_LOCATION = re.compile(r"^\[[0-9:]+\] \S+?:\d+: ")  # xgrammar's "[time] file.cc:line: " prefix


class GrammarError(Exception):
    """A constraint that does not compile; the message says why (the request's fault)."""


# xgrammar 0.2.8 writes a string with minLength/maxLength as a repetition of this class, which lets
# raw control characters (U+0000-U+001F) in: invalid JSON (RFC 8259 section 7). Its other strings
# exclude them; so do ours.
_LENGTH_BOUNDED_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'


def json_schema_grammar(schema: str) -> str:
    """The EBNF grammar of a JSON schema's compact instances, with no raw control characters in
    strings (what the engine compiles; the tests' transformers oracle compiles the same)."""
    grammar = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=JSON_SEPARATORS))
    return grammar.replace(_LENGTH_BOUNDED_CHAR, _JSON_STRING_CHAR)


def _message(exc: Exception) -> str:
    return _LOCATION.sub("", str(exc).strip()) or type(exc).__name__


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose only sentences are the choices (a JSON string literal is an EBNF literal)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class StructuredOutputs:
    """Compiled grammars (any thread) and the matchers of running requests (engine thread)."""

    def __init__(self, tokenizer, vocab_size: int, limits: EngineLimits):
        """``vocab_size``: the model's logits width (the tokenizer's may be smaller)."""
        self.vocab_size = vocab_size
        self.limits = limits
        self._compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size),
                                             max_threads=1, cache_enabled=False)  # we cache, by canonical text
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        # the step's bitmasks are filled here while the model runs its forward pass (the sampler waits)
        self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
        self._lock = threading.Lock()
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()  # LRU
        self._matchers: dict[int, xgr.GrammarMatcher] = {}  # request id -> matcher
        self._masks: dict[int, torch.Tensor] = {}  # request id -> its bitmask, one tensor reused
        self.num_compiles = 0  # grammars compiled since start (cache misses)

    # -- compiling (any thread) --------------------------------------------------------------
    def compile(self, structured: StructuredOutput) -> Future:
        """The future compiled grammar of ``structured`` (GrammarError if it does not compile)."""
        with self._lock:
            future = self._compiled.get(structured.key)
            if future is not None:
                self._compiled.move_to_end(structured.key)
                return future
            future = self._pool.submit(self._compile, structured)
            self._compiled[structured.key] = future
            self.num_compiles += 1
            while len(self._compiled) > self.limits.grammar_cache_size:
                self._compiled.popitem(last=False)
            return future

    def _compile(self, structured: StructuredOutput) -> xgr.CompiledGrammar:
        kind, spec = structured.kind, structured.spec
        try:
            if kind in ("json", "json_object"):
                return self._compiler.compile_grammar(json_schema_grammar(spec if kind == "json" else '{"type": "object"}'))
            if kind == "regex":
                return self._compiler.compile_regex(spec)
            if kind == "choice":
                return self._compiler.compile_grammar(choice_grammar(json.loads(spec)))
            return self._compiler.compile_grammar(spec)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the parser's message
            what = {"json": "the JSON schema", "json_object": "the JSON grammar", "regex": "the regex",
                    "choice": "the choices", "grammar": "the grammar"}[kind]
            raise GrammarError(f"{what} does not compile: {_message(exc)}") from None

    # -- matching (engine thread) --------------------------------------------------------------
    def has(self, request_id: int) -> bool:
        return request_id in self._matchers

    def bitmask(self, request_id: int, compiled: xgr.CompiledGrammar) -> torch.Tensor:
        """int32 [1, vocab/32]: the request's bitmask tensor (its matcher is made on the first call),
        filled with the tokens its grammar allows next by ``fill`` (one tensor per request, refilled
        each step: it is sampled before the next fill)."""
        if request_id not in self._matchers:
            self._matchers[request_id] = xgr.GrammarMatcher(compiled)
            self._masks[request_id] = xgr.allocate_token_bitmask(1, self.vocab_size)
        return self._masks[request_id]

    def fill(self, request_ids: list[int]) -> Future:
        """Fill these requests' bitmasks on the mask thread, so that it overlaps the forward pass;
        the sampler waits for the future. Their matchers are not touched by the engine thread
        until then: it advances them only with the tokens sampled after the wait."""
        work = [(self._matchers[rid], self._masks[rid]) for rid in request_ids]

        def run() -> None:
            for matcher, mask in work:
                matcher.fill_next_token_bitmask(mask)

        return self._filler.submit(run)

    def accept(self, request_id: int, token: int) -> bool:
        """Advance the request's matcher by ``token``; False if the grammar refuses it (the mask
        makes that impossible)."""
        matcher = self._matchers.get(request_id)
        return matcher is None or matcher.accept_token(token)

    def ended(self, request_id: int) -> bool:
        """Whether the request's grammar has taken its stop token (nothing may follow)."""
        matcher = self._matchers.get(request_id)
        return matcher is not None and matcher.is_terminated()

    def release(self, request_id: int) -> None:
        self._matchers.pop(request_id, None)
        self._masks.pop(request_id, None)

    @property
    def num_matchers(self) -> int:
        return len(self._matchers)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._filler.shutdown(wait=False, cancel_futures=True)


_BITS = torch.arange(32, dtype=torch.int32)  # bit j of a mask's word w is token 32 * w + j


def apply_bitmasks(logits: torch.Tensor, masks: list[torch.Tensor], rows: list[int]) -> None:
    """Mask (in place, to -inf) the tokens each of ``rows`` may not sample: ``masks[i]`` is row ``rows[i]``'s.

    Not xgrammar's ``apply_token_bitmask_inplace``: its ``indices`` pick the same row of the logits
    and of the bitmask (so a batch whose constrained rows are not its first ones failed), and on the
    CPU it cost 60 us for 16 rows of a 512-token vocabulary, where these few tensor ops cost less."""
    allowed = ((torch.cat(masks).unsqueeze(-1) >> _BITS) & 1).view(len(rows), -1)[:, :logits.shape[1]]
    if rows == list(range(logits.shape[0])):
        logits.masked_fill_(allowed == 0, float("-inf"))
    else:
        index = torch.tensor(rows)
        logits[index] = logits[index].masked_fill(allowed == 0, float("-inf"))
