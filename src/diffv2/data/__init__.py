"""Data pipeline: text sources, tokenizers, token shards, dataset preparation and batch loaders."""

from .corpus import default_corpus_documents, default_corpus_info, iter_documents
from .loader import EvalBatches, TokenLoader
from .prepare import load_manifest, prepare_dataset, verify_dataset
from .shards import read_shard, write_shard
from .tokenizer import Tokenizer

__all__ = [
    "EvalBatches",
    "TokenLoader",
    "Tokenizer",
    "default_corpus_documents",
    "default_corpus_info",
    "iter_documents",
    "load_manifest",
    "prepare_dataset",
    "read_shard",
    "verify_dataset",
    "write_shard",
]
