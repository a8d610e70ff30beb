r"""Incremental tokenization of streamed documents.

A document may arrive in pieces of any size: str pieces, or bytes split anywhere, even inside a
multi-byte UTF-8 sequence. ``IncrementalTokenizer`` turns the pieces into exactly the token ids
that ``tokenizer(whole_text, add_special_tokens=False).input_ids`` gives, emitting tokens as soon
as they are final and holding back only a short tail of text.

Why it is exact. Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM) first split the text
into pre-tokens with a regex and never merge across pre-token boundaries, so the ids of a text are
the ids of its pre-tokens, one after another. The regex has no look-behind: scanning from a
boundary of the whole text finds the same pre-tokens as scanning from the start. It does look
ahead, by a bounded amount: a letter/digit/punctuation run looks one character past its end, a
whitespace run looks through the whole run and one character more (a space before a word joins
the word; ``\s+(?!\S)`` gives back its last character, so "\n\nChapter" has the pre-tokens
"\n", "\n", "Chapter" but a text ending in "\n\n" has one), and contractions (``'re``, ``'ll``)
look up to three characters from their start. So the pending text is cut only at the start of a
pre-token P such that

  * P contains a non-whitespace character (the whitespace run before P has ended), and
  * P is not the last piece (at least one more character follows P),

and at the last such place. The pre-tokens before the cut then cannot change, whatever follows.
We encode the whole pending text (so that the pre-token before the cut sees its context) and
emit the tokens that start before the cut; P and everything after it, at least two pre-tokens
and so at least two tokens, stay pending. Each feed costs the piece plus this short tail.

Added tokens (``<|im_end|>`` and the like) are matched before pre-tokenization, so the text is
split around them first. A tail that could still grow into one (``<|im_e``) ends a text segment
in the whole text, so cuts are looked for only before it.

Known bound. A single pre-token longer than ``max_pending_chars`` (thousands of letters, digits,
punctuation or whitespace in one run) has no safe cut. To keep memory bounded it is cut anyway,
between two of the tokens that the pending text encodes to, holding back the last three tokens
and at least ``max_pending_chars // 8`` characters (``forced_cuts`` counts these cuts). After
each feed ``pending_text`` thus holds at most ``max_pending_chars`` characters, or
``max_pending_chars // 8`` plus three of the longest tokens if that is more (81 characters each
for SmolLM2). A forced cut relies on BPE not changing the early tokens of a long word as the word
grows, which usually holds but is not guaranteed; the emitted tokens always decode to the same
text. The tests measure no differing token on long runs of letters, words, punctuation,
whitespace, digits, CJK, emoji and random mixes of each (and so did checks with cuts forced
every 64 characters). Ordinary text never triggers it.

When the tokenizer's pre-tokenizer or normalizer makes pieces depend on where the text starts
(e.g. a SentencePiece or ``add_prefix_space`` prefix space), streaming cannot be exact;
``__init__`` streams a short sample one character at a time and refuses such tokenizers with a
ValueError.
"""

from __future__ import annotations

import bisect
import codecs
import re
from typing import Any

from tokenizers import PreTokenizedString, Tokenizer

# A mix of the context-dependent cases (contractions, whitespace runs, newlines before words,
# digits, punctuation runs, non-ASCII) fed one character at a time by the self-check in __init__.
# id(tokenizer) -> (tokenizer, its prepared read-only attributes); the tokenizer is held so its id stays unique.
_SHARED: dict[int, tuple[Any, dict]] = {}
_SHARED_ATTRS = ("_backend", "_added_re", "_added_prefixes", "_max_added")

_SELF_CHECK_TEXT = "Title\n\nHello, world! It's 2024...\n\n  x = [1, 22, 333]\tdon't  stop\u00e9 \u65e5\u672c\n"

_STATE_VERSION = 1

# Tokens held back by a forced cut (inside one giant pre-token), besides max_pending // 8 characters.
_FORCED_HOLD_TOKENS = 3


class IncrementalTokenizer:
    """Turns text arriving in pieces of any size into the token stream of the whole text.

    ``feed`` returns the tokens that have become final; ``flush`` ends the document, returns the
    rest and resets the object for the next document. ``state``/``load_state`` save and restore
    the pending tail (JSON-serialisable) so a stream can be resumed elsewhere.
    """

    def __init__(self, tokenizer: Any, *, max_pending_chars: int = 512) -> None:
        """``tokenizer``: a transformers fast tokenizer (or a ``tokenizers.Tokenizer``).

        ``max_pending_chars`` bounds the held-back text; it is only reached by a pre-token
        that long (see the module docstring).
        """
        backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            raise TypeError(
                f"IncrementalTokenizer needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}"
            )
        if backend.pre_tokenizer is None:
            raise ValueError("IncrementalTokenizer needs a pre-tokenizer: BPE over a whole text can't be streamed")
        if max_pending_chars < 64:
            raise ValueError("max_pending_chars must be at least 64")
        self._max_pending = max_pending_chars
        self._start_document()
        shared = _SHARED.get(id(tokenizer))
        if shared is not None and shared[0] is tokenizer:
            # Every session of an engine streams with the same tokenizer: prepare it once (copy + self-check
            # take about 0.3 s and 8 MB), share the read-only parts.
            self.__dict__.update(shared[1])
            return
        # A private copy: the shared backend may carry truncation/padding settings (transformers sets
        # them per call), and we must not change the caller's object either.
        self._backend = Tokenizer.from_str(backend.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        # Post-processors add nothing without special tokens but may trim offsets, which we need raw.
        self._backend.post_processor = None
        # Added tokens are cut out of the text before pre-tokenization; longest first so that, like
        # the tokenizer, the alternation prefers the longer of two tokens starting at one position.
        added = sorted(self._backend.get_added_tokens_decoder().values(), key=lambda t: -len(t.content))
        added = [t for t in added if t.content]
        parts = [(r"\s*" if t.lstrip else "") + re.escape(t.content) + (r"\s*" if t.rstrip else "") for t in added]
        self._added_re = re.compile("|".join(parts)) if parts else None
        # Every proper prefix of an added token -> whether a token it begins swallows the whitespace
        # before it. A pending tail equal to one of them may still grow into the token.
        self._added_prefixes: dict[str, bool] = {}
        for t in added:
            for k in range(1, len(t.content)):
                self._added_prefixes[t.content[:k]] = self._added_prefixes.get(t.content[:k], False) or t.lstrip
        self._max_added = max((len(t.content) for t in added), default=0)
        self._self_check(tokenizer)
        _SHARED[id(tokenizer)] = (tokenizer, {k: getattr(self, k) for k in _SHARED_ATTRS})

    def _start_document(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self._pending = ""
        self._bytes_in = 0  # bytes fed in this document, for error messages
        self._forced_cuts = 0

    # ------------------------------------------------------------------ public API

    def feed(self, piece: str | bytes) -> list[int]:
        """Add the next piece of the document; returns the tokens that are now final.

        ``bytes`` may end (and start) inside a UTF-8 sequence. Invalid UTF-8 raises a
        ``UnicodeDecodeError`` (a ValueError) and leaves the state as it was before the call.
        """
        if isinstance(piece, (bytes, bytearray, memoryview)):
            text = self._decode(bytes(piece), final=False)
        elif isinstance(piece, str):
            if self.pending_bytes:
                raise ValueError(
                    f"text piece arrived while {len(self.pending_bytes)} byte(s) of an incomplete UTF-8 "
                    "sequence are pending; feed the rest of the sequence as bytes first"
                )
            text = piece
            self._bytes_in += len(piece.encode())
        else:
            raise TypeError(f"feed() takes str or bytes, got {type(piece).__name__}")
        if not text:
            return []
        self._pending += text
        return self._emit_final()

    def flush(self) -> list[int]:
        """End of document: returns all remaining tokens and resets for the next document.

        Raises ``UnicodeDecodeError`` (a ValueError) if the document ended inside a UTF-8
        sequence; the state is then left unchanged.
        """
        self._pending += self._decode(b"", final=True)
        ids = self._encode(self._pending)
        self.reset()
        return ids

    def reset(self) -> None:
        """Forget everything pending (start a new document)."""
        self._start_document()

    @property
    def pending_text(self) -> str:
        """Text received but not yet emitted as tokens."""
        return self._pending

    @property
    def forced_cuts(self) -> int:
        """How many times this document's pending text was cut without a safe boundary (see module docstring)."""
        return self._forced_cuts

    @property
    def pending_bytes(self) -> bytes:
        """Trailing bytes of an incomplete UTF-8 sequence."""
        return self._decoder.getstate()[0]

    @property
    def bytes_received(self) -> int:
        """UTF-8 bytes of the current document fed so far (a resumed stream sends the rest from here)."""
        return self._bytes_in

    def state(self) -> dict:
        """A JSON-serialisable snapshot of the pending tail (text, and incomplete bytes as hex)."""
        return {
            "version": _STATE_VERSION,
            "pending_text": self._pending,
            "pending_bytes": self.pending_bytes.hex(),
            "bytes_received": self._bytes_in,
        }

    def load_state(self, state: dict) -> None:
        """Restore a snapshot from ``state()``; later feeds continue as if never interrupted."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported tokenizer state version {state.get('version')!r}")
        text, raw = state.get("pending_text"), state.get("pending_bytes")
        if not isinstance(text, str) or not isinstance(raw, str):
            raise ValueError("tokenizer state needs str 'pending_text' and hex str 'pending_bytes'")
        pending_bytes = bytes.fromhex(raw)
        if len(pending_bytes) > 3:  # a UTF-8 sequence is at most 4 bytes, so at most 3 can wait
            raise ValueError(f"tokenizer state has {len(pending_bytes)} pending bytes; at most 3 are possible")
        self.reset()
        self._pending = text
        self._decoder.setstate((pending_bytes, 0))
        self._bytes_in = int(state.get("bytes_received", len(text.encode()) + len(pending_bytes)))

    # ------------------------------------------------------------------ internals

    def _decode(self, data: bytes, *, final: bool) -> str:
        saved = self._decoder.getstate()
        try:
            text = self._decoder.decode(data, final=final)
        except UnicodeDecodeError as e:
            self._decoder.setstate(saved)  # reject the piece, keep the stream usable
            # e.start counts from the first held-back byte, which arrived before this piece.
            at = self._bytes_in - len(saved[0]) + e.start
            truncated = final and e.reason.startswith("unexpected end")
            what = "the document ends inside a UTF-8 sequence" if truncated else e.reason
            raise UnicodeDecodeError(
                "utf-8", e.object, e.start, e.end, f"invalid UTF-8 in streamed document at byte {at}: {what}"
            ) from None
        self._bytes_in += len(data)
        return text

    def _encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids if text else []

    def _emit_final(self) -> list[int]:
        """Emit the tokens of the pending text up to the last safe cut; keep the rest pending."""
        text = self._pending
        # A tail that may still become an added token will end its text segment there, so the
        # pre-tokens just before it may change: look for cuts only in the text before it.
        limit = self._partial_added_start(text)
        cut = self._last_safe_cut(text[:limit])
        if cut == 0 and len(text) <= self._max_pending:
            return []
        # Encode all pending text, not text[:cut]: the pre-token before the cut looks past it (the
        # "\n\n" of "\n\nChapter" is two pre-tokens, but one at the end of a text).
        enc = self._backend.encode(text, add_special_tokens=False)
        starts = [a for a, _ in enc.offsets]  # char offsets (no post-processor trims them)
        if cut == 0:
            # No safe cut in a long tail: one huge pre-token. Cut anyway to bound memory, between two
            # of its tokens, holding back the last few tokens and at least max_pending // 8 characters,
            # since BPE's split of a growing word changes near its end (see "Known bound").
            target = min(len(text) - self._max_pending // 8, limit)
            ends = [b for _, b in enc.offsets]
            # A token start that is also a character start (byte-level tokens may split a character).
            last = len(starts) - _FORCED_HOLD_TOKENS
            cuts = (starts[i] for i in range(1, last + 1) if starts[i] <= target and ends[i - 1] <= starts[i])
            cut = max(cuts, default=0)
            if cut == 0:
                return []
            self._forced_cuts += 1
        # No token crosses a pre-token boundary, so the tokens before the cut are those starting before it.
        n = bisect.bisect_left(starts, cut)
        self._pending = text[cut:]
        return enc.ids[:n]

    def _last_safe_cut(self, text: str) -> int:
        """The char offset of the last safe cut in ``text`` (0 if none): the start of a pre-token
        that has a non-whitespace character and is followed by at least one more piece."""
        pieces: list[tuple[int, int]] = []  # (start, end) of every pre-token and added token
        pos = 0
        for m in self._added_re.finditer(text) if self._added_re is not None else ():
            pieces += self._pre_tokens(text, pos, m.start())
            pieces.append((m.start(), m.end()))
            pos = m.end()
        pieces += self._pre_tokens(text, pos, len(text))
        for start, end in reversed(pieces[:-1]):
            if not text[start:end].isspace():
                return start
        return 0

    def _pre_tokens(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        """Pre-token spans of ``text[start:end]`` (normalised as the tokenizer would), offset by ``start``."""
        if start >= end:
            return []
        segment = text[start:end]
        if self._backend.normalizer is None:
            splits = self._backend.pre_tokenizer.pre_tokenize_str(segment)
            return [(start + a, start + b) for _, (a, b) in splits]
        pts = PreTokenizedString(segment)
        normalizer = self._backend.normalizer
        pts.normalize(lambda ns: normalizer.normalize(ns))
        self._backend.pre_tokenizer.pre_tokenize(pts)
        splits = pts.get_splits(offset_referential="original", offset_type="char")
        return [(start + a, start + b) for _, (a, b), _ in splits]

    def _partial_added_start(self, text: str) -> int:
        """The earliest start of a tail of ``text`` that could still grow into an added token, else len(text)."""
        n = len(text)
        for j in range(max(0, n - self._max_added + 1), n):
            lstrip = self._added_prefixes.get(text[j:])
            if lstrip is not None:
                if lstrip:  # the token would also swallow the whitespace before it
                    while j > 0 and text[j - 1].isspace():
                        j -= 1
                return j
        return n

    def _self_check(self, tokenizer: Any) -> None:
        """Refuse tokenizers whose pieces depend on where the text starts (streaming cannot be exact)."""
        ids = [i for ch in _SELF_CHECK_TEXT for i in self.feed(ch)] + self.flush()
        if isinstance(tokenizer, Tokenizer):
            expected = self._encode(_SELF_CHECK_TEXT)
        else:  # the caller's own call, so that any wrapper behaviour is checked too
            expected = list(tokenizer(_SELF_CHECK_TEXT, add_special_tokens=False)["input_ids"])
        if ids != expected:
            raise ValueError(
                "this tokenizer's output depends on where the text starts (e.g. a SentencePiece prefix space), "
                "so it cannot be streamed exactly"
            )
