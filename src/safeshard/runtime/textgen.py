"""Text in, text out for a streamed model: the folder's tokenizer, its chat template, and
the new text as it is generated (what ``safeshard run MODEL "prompt"`` uses).

- :func:`load_tokenizer`: ``AutoTokenizer`` from the model folder; a folder without one
  is a :class:`~safeshard.errors.UsageError` that says to pass token ids instead.
- :func:`prompt_ids`: the prompt's token ids, through the tokenizer's chat template (one
  user message and the generation prompt) when it has one and ``chat`` allows it.
- :class:`TextStreamer`: a streamer for ``model.generate(..., streamer=...)`` (the
  ``put``/``end`` protocol of transformers' streamers) that hands each new piece of
  decoded text to a callback as soon as it is complete (a character split across
  tokens waits for its last byte).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safeshard.errors import UsageError

__all__ = ["TextStreamer", "load_tokenizer", "prompt_ids"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved beside the checkpoint at ``path`` (a file or its folder)."""
    folder = Path(path)
    folder = folder if folder.is_dir() else folder.parent
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise UsageError(
            f"{folder}: no tokenizer here (none of {', '.join(_TOKENIZER_FILES)}) to turn the "
            "prompt into tokens; save one beside the model, or pass token ids (--prompt-ids)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise UsageError(
            f"{folder}: transformers cannot load the tokenizer here ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}); pass token ids (--prompt-ids) instead"
        ) from None


def prompt_ids(tokenizer: Any, text: str, *, chat: bool | None = None) -> list[int]:
    """Token ids for ``text``: wrapped in the tokenizer's chat template as one user turn
    (with the generation prompt) when it has one, unless ``chat`` is False; ``chat=True``
    without a template is a :class:`UsageError`."""
    template = getattr(tokenizer, "chat_template", None)
    if chat and not template:
        raise UsageError("the tokenizer has no chat template; run without --chat-template")
    if template and chat is not False:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    out = [int(i) for i in ids]
    if not out:
        raise UsageError("the prompt gives no tokens; give some text")
    return out


class TextStreamer:
    """Decodes the tokens ``generate`` produces and calls ``on_text(piece)`` with each new
    piece of text. The first ``put`` (the prompt, or an encoder-decoder's start token) is
    skipped; special tokens are left out."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.tokens: list[int] = []
        self.text = ""
        self._prompt = True

    def put(self, value: Any) -> None:
        if self._prompt:
            self._prompt = False
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, *, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return  # a character split across tokens: wait for the rest
        piece = text[len(self.text) :]
        self.text = text
        if piece:
            self.on_text(piece)
