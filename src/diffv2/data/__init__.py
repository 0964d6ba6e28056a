"""Data pipeline: text sources, tokenizers, token shards, dataset preparation, batch loaders, document index."""

from .corpus import default_corpus_documents, default_corpus_info, iter_documents, iter_labeled_documents
from .documents import HALVES, SplitDocuments, split_documents
from .loader import EvalBatches, TokenLoader, spread_windows
from .manifest import load_manifest, verify_dataset
from .notices import describe_skipped
from .prepare import prepare_dataset
from .shards import publish_mode, read_shard, write_shard
from .tokenizer import Tokenizer

__all__ = [
    "HALVES",
    "EvalBatches",
    "SplitDocuments",
    "TokenLoader",
    "Tokenizer",
    "default_corpus_documents",
    "default_corpus_info",
    "describe_skipped",
    "iter_documents",
    "iter_labeled_documents",
    "load_manifest",
    "prepare_dataset",
    "publish_mode",
    "read_shard",
    "split_documents",
    "spread_windows",
    "verify_dataset",
    "write_shard",
]
