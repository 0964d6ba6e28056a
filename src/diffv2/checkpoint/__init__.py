"""Checkpoints on disk: crash-safe saving, checksum verification, finding a run's latest, loading weights or a
whole training state back, and :func:`load_pretrained`, the one loader behind generate, inspect, compare
reports and the Hugging Face export.

A checkpoint is ``<run_dir>/checkpoints/step_XXXXXXXX/`` holding ``model.safetensors``, ``optimizer.pt``
(optional), ``rng.pt``, ``state.json``, ``config.json``, ``tokenizer.json`` (optional) and, written last,
``checksums.json`` (sha256 + size of the others). Weights and optimizer state are full (unsharded) and keyed by
parameter name whatever the run's parallelism: under torch.distributed every rank calls :func:`save_checkpoint`
and :func:`load_checkpoint` (an FSDP model is gathered and re-sharded collectively), and rank 0 alone writes.
Reading or writing a plain model's checkpoint never imports ``torch.distributed.checkpoint`` or FSDP.

Modules: :mod:`.layout` (finding, verifying), :mod:`.save`, :mod:`.load`, :mod:`.state` (weights and optimizer
state against a live model), :mod:`.sharded` (the same for FSDP2, imported on demand), :mod:`.rng`,
:mod:`.files` (synced writes, checksums), :mod:`.pretrained`.
"""

from .layout import FORMAT, foreign_folder, latest_checkpoint, list_checkpoints, verify_checkpoint
from .load import load_checkpoint, load_model_weights, model_config_of, read_checkpoint_meta, read_tokenizer_json
from .pretrained import Pretrained, load_pretrained, pick_device
from .save import save_checkpoint
from .state import canonical_name, gather_weights

__all__ = [
    "FORMAT",
    "Pretrained",
    "canonical_name",
    "foreign_folder",
    "gather_weights",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "load_pretrained",
    "model_config_of",
    "pick_device",
    "read_checkpoint_meta",
    "read_tokenizer_json",
    "save_checkpoint",
    "verify_checkpoint",
]
