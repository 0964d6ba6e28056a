"""Offline evaluation with EleutherAI's lm-evaluation-harness (optional extra: ``pip install 'diffv2[eval]'``).

``evaluate_lm`` runs lm-eval in-process on a model object (lm-eval's ``HFLM`` wraps our ``DiffV2ForCausalLM``
and its tokenizer), an HF folder or a native checkpoint. ``write_perplexity_task`` turns documents (e.g.
``val_documents(data_dir)``, our val split decoded back to text) into a local ``loglikelihood_rolling`` task:
a jsonl file plus a task yaml that lm-eval reads with ``--include_path``; nothing touches the network.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.loader import split_shard_paths
from ..data.shards import read_shard
from ..data.tokenizer import Tokenizer
from ..errors import ConfigError, DataError
from ..model import Transformer
from .convert import hf_tokenizer, is_hf_folder, load_hf, load_native, read_hf_tokenizer, to_hf

PathLike = str | os.PathLike[str]
TASK_NAME = "diffv2_val_ppl"


def val_documents(data_dir: PathLike, max_docs: int | None = None, max_chars: int | None = None) -> list[str]:
    """The documents of a prepared dataset's val split as text (split at the end-of-text token, decoded)."""
    paths, manifest = split_shard_paths(data_dir, "val")
    tok_file = Path(data_dir) / ((manifest or {}).get("tokenizer_file") or "tokenizer.json")
    tok = Tokenizer.from_file(tok_file)
    tokens = np.concatenate([read_shard(p) for p in paths]) if paths else np.zeros(0, dtype=np.int64)
    cuts = np.flatnonzero(tokens == tok.eot_id)
    docs, start = [], 0
    for end in [*cuts.tolist(), len(tokens)]:
        if end > start:
            text = tok.decode(tokens[start:end].tolist())
            if text.strip():
                docs.append(text[:max_chars] if max_chars else text)
        start = end + 1
        if max_docs is not None and len(docs) >= max_docs:
            break
    if not docs:
        raise DataError(f"{data_dir}: the val split has no documents")
    return docs


def write_perplexity_task(out_dir: PathLike, documents: list[str], name: str = TASK_NAME) -> Path:
    """Write ``<out_dir>/<name>.jsonl`` and ``<out_dir>/<name>.yaml``: a ``loglikelihood_rolling`` task with
    word/byte perplexity and bits per byte. Use ``out_dir`` as lm-eval's ``include_path``; returns it."""
    if not documents:
        raise ConfigError("documents: give at least one document for the perplexity task")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents), encoding="utf-8")
    # JSON is valid YAML, which saves a yaml writer and any quoting question for paths
    task = {
        "task": name,
        "dataset_path": "json",
        # datasets' json builder is local; its cache goes beside the data so nothing else is written
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(out / ".datasets-cache")},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "should_decontaminate": True,
        "doc_to_decontamination_query": "{{text}}",
        # aggregation and direction stated, so lm-eval has no defaults to warn about
        "metric_list": [
            {"metric": m, "aggregation": agg, "higher_is_better": False}
            for m, agg in (
                ("word_perplexity", "weighted_perplexity"),
                ("byte_perplexity", "weighted_perplexity"),
                ("bits_per_byte", "bits_per_byte"),
            )
        ],
        "metadata": {"version": 1.0},
    }
    (out / f"{name}.yaml").write_text(json.dumps(task, indent=2) + "\n", encoding="utf-8")
    return out


def _model_and_tokenizer(model_or_path: Any, tokenizer: Any) -> tuple[Any, Any]:
    """An HF model and HF tokenizer from whatever ``evaluate_lm`` was given."""
    from transformers import AutoTokenizer, PreTrainedModel

    if isinstance(tokenizer, Tokenizer) or (isinstance(tokenizer, str) and tokenizer.lstrip().startswith("{")):
        tokenizer = hf_tokenizer(tokenizer)  # our Tokenizer or tokenizer.json text
    elif isinstance(tokenizer, str | os.PathLike):
        path = Path(tokenizer)
        is_file = path.is_file()
        tokenizer = (
            hf_tokenizer(path.read_text(encoding="utf-8")) if is_file else AutoTokenizer.from_pretrained(str(path))
        )
    if isinstance(model_or_path, PreTrainedModel):
        model = model_or_path
    elif isinstance(model_or_path, Transformer):
        model = to_hf(model_or_path)
    elif isinstance(model_or_path, str | os.PathLike) and is_hf_folder(model_or_path):
        model = load_hf(model_or_path)
        if tokenizer is None:
            tokenizer = read_hf_tokenizer(model_or_path, model.config.vocab_size)
    elif isinstance(model_or_path, str | os.PathLike):
        native, tok, _ = load_native(model_or_path)
        model = to_hf(native)
        if tokenizer is None and tok is not None:
            tokenizer = hf_tokenizer(tok)
    else:
        raise ConfigError(f"model_or_path: expected a model, an HF folder or a checkpoint, got {type(model_or_path)}")
    if tokenizer is None:
        raise ConfigError("tokenizer: none given and none found with the model; pass tokenizer=")
    return model.eval(), tokenizer


@torch.no_grad()
def evaluate_lm(
    model_or_path: Any,
    tasks: list[str],
    *,
    tokenizer: Any = None,
    include_path: PathLike | list[PathLike] | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    limit: int | float | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate with lm-eval in-process; returns lm-eval's ``results`` table ({task: {metric: value}}).

    ``model_or_path``: a ``DiffV2ForCausalLM`` (or any HF causal LM), a native ``Transformer``, an HF folder or
    a native run/checkpoint dir. ``tokenizer``: an HF tokenizer, our ``Tokenizer``, tokenizer.json text or a
    folder; defaults to the one stored with the model. ``include_path``: folders of local task yamls (see
    ``write_perplexity_task``). ``max_length`` defaults to the model's max_position_embeddings. Other keywords
    go to ``lm_eval.simple_evaluate``.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("evaluate_lm needs lm-eval: pip install 'diffv2[eval]' (or 'lm-eval>=0.4')") from None
    model, tok = _model_and_tokenizer(model_or_path, tokenizer)
    # Passing a built model is how in-process evaluation works; lm-eval warns about it every time (twice).
    quiet = _DropMessages("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")
    logger = logging.getLogger("lm_eval.models.huggingface")
    logger.addFilter(quiet)
    try:
        lm = HFLM(
            pretrained=model,
            tokenizer=tok,
            backend="causal",
            batch_size=batch_size,
            max_length=max_length or model.config.max_position_embeddings,
        )
    finally:
        logger.removeFilter(quiet)
    try:  # scanning lm-eval's thousands of built-in task yamls is slow; skip them when only local tasks are named
        manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
    except TypeError:  # older lm-eval without include_defaults
        manager = TaskManager(include_path=include_path)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, **kwargs)
    if out is None:  # only non-zero ranks of a distributed run get None
        return {}
    return out["results"]


class _DropMessages(logging.Filter):
    """Drops log records that start with one of the given messages."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.starts)
