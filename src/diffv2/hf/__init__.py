"""Hugging Face ecosystem: transformers model/config, native ↔ HF conversion, Llama upcycling, lm-eval.

Importing this package registers ``DiffV2Config`` / ``DiffV2ForCausalLM`` with ``AutoConfig`` and
``AutoModelForCausalLM`` (model_type "diffv2"), so ``AutoModelForCausalLM.from_pretrained(folder)`` works
in-process; a saved folder also loads anywhere with ``trust_remote_code=True`` (the two self-contained files
``configuration_diffv2.py`` / ``modeling_diffv2.py`` are copied beside the weights). Needs ``transformers>=5``;
the lm-eval helpers (``evaluate_lm``, ``write_perplexity_task``) need ``lm-eval`` and import it lazily.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_diffv2 import DiffV2Config
from .convert import (
    export_hf,
    from_hf_config,
    hf_tokenizer,
    import_hf,
    is_hf_folder,
    load_hf,
    load_hf_native,
    load_native,
    read_hf_config,
    read_hf_tokenizer,
    save_hf,
    save_native,
    to_hf,
    to_hf_config,
    to_native,
)
from .modeling_diffv2 import DiffV2ForCausalLM
from .upcycle import llama_model_config, upcycle

AutoConfig.register(DiffV2Config.model_type, DiffV2Config, exist_ok=True)
AutoModelForCausalLM.register(DiffV2Config, DiffV2ForCausalLM, exist_ok=True)

_LAZY = {"evaluate_lm": "lmeval", "write_perplexity_task": "lmeval", "val_documents": "lmeval"}


def __getattr__(name: str) -> Any:
    # lm-eval is optional and slow to import: load its helpers on first use only
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DiffV2Config",
    "DiffV2ForCausalLM",
    "evaluate_lm",
    "export_hf",
    "from_hf_config",
    "hf_tokenizer",
    "import_hf",
    "is_hf_folder",
    "llama_model_config",
    "load_hf",
    "load_hf_native",
    "load_native",
    "read_hf_config",
    "read_hf_tokenizer",
    "save_hf",
    "save_native",
    "to_hf",
    "to_hf_config",
    "to_native",
    "upcycle",
    "val_documents",
    "write_perplexity_task",
]
