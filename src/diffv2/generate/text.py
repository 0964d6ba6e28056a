"""Text in and out of generation (``diffv2 generate`` and the server): a tokenizer's encode/decode behind one
interface, chat prompts, and the incremental detokenizer that turns a stream of token ids into text deltas and
watches for stop strings."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

# The chat prompt for a tokenizer without a chat template: each message as "Role: content" and a blank line,
# then "Assistant:" for the model to continue.
PLAIN_CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


class TextCodec:
    """A tokenizer as generation uses it: a diffv2 ``Tokenizer`` or a transformers tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._hf = hasattr(tokenizer, "apply_chat_template")  # transformers' PreTrainedTokenizerBase
        if self._hf:
            self.eos_id = tokenizer.eos_token_id
            self.chat_template = getattr(tokenizer, "chat_template", None)
        else:
            self.eos_id, self.chat_template = tokenizer.eot_id, None

    def encode(self, text: str) -> list[int]:
        if self._hf:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_text(self, token: int) -> str:
        return self.decode([token])

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat: the tokenizer's chat template when it has one, else :data:`PLAIN_CHAT_ROLES`'s
        plain template."""
        if self.chat_template:
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as err:  # a Jinja template raising on these messages (e.g. roles out of order)
                raise ConfigError(f"messages: the chat template refused them ({err})") from None
            return self.encode(text)
        return self.encode(plain_chat_text(messages))


def plain_chat_text(messages: list[dict[str, str]]) -> str:
    """``System: ...\\n\\nUser: ...\\n\\nAssistant: ...\\n\\nAssistant:``"""
    turns = [f"{PLAIN_CHAT_ROLES[m['role']]}: {m['content']}\n\n" for m in messages]
    return "".join(turns) + "Assistant:"


class TextStream:
    """Token ids in, text deltas out, as a stream sees them: a token that ends inside a multi-byte character
    waits for the rest of it, and text that could be the start of a stop string waits until it is not. A stop
    string ends the text before it (it is not part of the output).

    Decoding redoes only the last few tokens each time (the "anchor" window), so a long output costs the same
    per token as a short one."""

    _WINDOW = 6
    _MAX_WAIT = 4  # a UTF-8 character has at most 4 bytes: past that the bytes are invalid, show them

    def __init__(self, codec: TextCodec, stop: list[str] | None = None) -> None:
        self.codec, self.stop = codec, [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self._anchor = 0  # tokens before it are decoded for good
        self._anchor_text = ""  # what ids[anchor:] decoded to at the last complete token
        self._held = ""  # decoded text not handed out yet (it may begin a stop string)
        self._waiting = 0  # tokens since the text last ended on a complete character
        self.stopped = False

    def push(self, token: int) -> str:
        """The text this token completes (possibly ""); after a stop string, ``stopped`` is set (and later
        tokens give nothing)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        piece = self.codec.decode(self.ids[self._anchor :])
        if piece.endswith("\ufffd") and self._waiting < self._MAX_WAIT:  # a multi-byte character in pieces
            self._waiting += 1
            return ""
        self._waiting = 0
        new = piece[len(self._anchor_text) :]
        self._anchor_text = piece
        if len(self.ids) - self._anchor > self._WINDOW:
            self._anchor = len(self.ids) - self._WINDOW // 2
            self._anchor_text = self.codec.decode(self.ids[self._anchor :])
        return self._release(new)

    def flush(self) -> str:
        """At the end: what was held back (a stop string's unfinished start, an incomplete character)."""
        if self.stopped:
            return ""
        tail = self.codec.decode(self.ids[self._anchor :])[len(self._anchor_text) :]
        out, self._held = self._held + tail, ""
        return out

    def _release(self, new: str) -> str:
        if not self.stop:
            return new
        text = self._held + new
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        keep = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]
