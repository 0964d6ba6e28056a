"""Tokenizers: byte-level, trained byte-level BPE, or any tokenizer.json, all stored as one tokenizer.json."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..config import check_text
from ..errors import ConfigError, DataError
from .shards import atomic_write_bytes

EOT_TOKEN = "<|endoftext|>"
# End-of-text spellings used by common tokenizers, in order of preference.
EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table that byte-level BPE uses (printable bytes map to themselves).

    Written out here so that the byte tokenizer gets id == byte value; the tests check that it has the
    same characters as ``tokenizers``' own ByteLevel alphabet.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _byte_level_parts(tok: tokenizers.Tokenizer) -> None:
    # add_prefix_space=False keeps a leading space out of the text, so decode(encode(s)) == s exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()


class Tokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` with a known end-of-text token.

    Text is encoded without special tokens and with ``encode_special_tokens`` on, so a document that
    contains the literal string "<|endoftext|>" is encoded as plain text and can never fake a document
    boundary; the end-of-text id is only added by the data pipeline.
    """

    def __init__(self, tok: tokenizers.Tokenizer, kind: str, eot_token: str, source: str = "") -> None:
        eot_id = tok.token_to_id(eot_token)
        if eot_id is None:
            raise DataError(f"tokenizer {source or '(in memory)'} has no {eot_token!r} token")
        tok.encode_special_tokens = True
        self._tok = tok
        self._kind = kind
        self._eot_token = eot_token
        self._eot_id = int(eot_id)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def byte_level(cls) -> Tokenizer:
        """256 byte tokens (id == byte value) plus ``<|endoftext|>`` as id 256; nothing to train."""
        table = _bytes_to_unicode()
        vocab = {table[b]: b for b in range(256)}
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
        _byte_level_parts(tok)
        tok.add_special_tokens([EOT_TOKEN])
        return cls(tok, "byte", EOT_TOKEN)

    @classmethod
    def train_bpe(
        cls, documents: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False
    ) -> Tokenizer:
        """Train a byte-level BPE tokenizer (``<|endoftext|>`` + the 256 bytes + merges) on ``documents``."""
        if vocab_size < 257:
            raise ConfigError(f"vocab_size must be at least 257 (256 bytes + end-of-text), got {vocab_size}")
        if min_frequency < 1:
            raise ConfigError(f"min_frequency must be at least 1, got {min_frequency}")
        tok = tokenizers.Tokenizer(models.BPE())
        _byte_level_parts(tok)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOT_TOKEN],
            # The full byte alphabet makes every string encodable, even bytes absent from the corpus.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(documents, trainer=trainer)
        return cls(tok, "bpe", EOT_TOKEN)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a local tokenizer.json; it must define an end-of-text token (e.g. ``<|endoftext|>``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not a tokenizer.json (not UTF-8 text at byte {e.start})") from None
        return cls.from_json_str(text, source=str(path))

    @classmethod
    def from_json_str(cls, text: str, source: str = "(in memory)") -> Tokenizer:
        """Build from the text of a tokenizer.json (e.g. the copy stored in a checkpoint)."""
        try:
            tok = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a plain Exception for any parse problem
            raise DataError(f"{source}: not a valid tokenizer.json ({str(e)[:200]})") from None
        eot = next((t for t in EOT_CANDIDATES if tok.token_to_id(t) is not None), None)
        if eot is None:
            raise DataError(
                f"{source}: no end-of-text token (looked for {', '.join(EOT_CANDIDATES)}); "
                "documents are separated by it, so add one to the tokenizer"
            )
        made = cls(tok, "file", eot, source=source)
        # A saved byte tokenizer is recognised, so the kind survives save -> from_file.
        if made.sha256() == _byte_level_sha256():
            made._kind = "byte"
        return made

    # ---- persistence -------------------------------------------------------------------------------
    def to_json_str(self) -> str:
        """The tokenizer as a tokenizer.json string."""
        return self._tok.to_str()

    def sha256(self) -> str:
        """sha256 of the canonical JSON (sorted keys), to check that a checkpoint and its data agree."""
        canonical = json.dumps(
            json.loads(self.to_json_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json atomically (temp file in the same folder, fsync, rename); returns the path."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        atomic_write_bytes(path, self.to_json_str().encode("utf-8"))
        return path

    # ---- encoding ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # the Rust side takes only valid Unicode: say what is wrong with the text
            check_text("text to encode", text, DataError)
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the tokenizers library."""
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are kept so decoding is faithful."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding size must be at least this)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        """Id of the end-of-text token that separates documents."""
        return self._eot_id

    @property
    def eot_token(self) -> str:
        """The end-of-text token string."""
        return self._eot_token

    @property
    def kind(self) -> str:
        """ "byte", "bpe" or "file" (loaded from a tokenizer.json that is not a byte tokenizer)."""
        return self._kind

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self._kind!r}, vocab_size={self.vocab_size}, eot_id={self._eot_id})"


@functools.lru_cache(maxsize=1)
def _byte_level_sha256() -> str:
    return Tokenizer.byte_level().sha256()
