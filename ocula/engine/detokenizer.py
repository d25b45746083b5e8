"""Incremental detokenisation of one sequence's output ids through an injected tokenizer.

Each step decodes only a short window: the text of ids[prefix:] minus the text of ids[prefix:read].
A window ending in U+FFFD is an incomplete UTF-8 / byte-fallback character: the text is held back until
the next token completes it. A few prompt ids seed the window so tokenizers that drop a leading space
(SentencePiece) still produce it for the first generated token.
"""

from __future__ import annotations

from typing import Any

_CONTEXT_IDS = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT_IDS:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one id; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
