"""Flags the command-line tests share: a model that trains in a fraction of a second on the CPU, and a run that
draws no progress bar and spends no time on samples, evaluation or diagnostics."""

# fmt: off
TINY_MODEL = [
    "--d_model", "32", "--n_layers", "1", "--n_heads", "2", "--n_kv_heads", "1", "--head_dim", "16",
    "--ffn_hidden", "32",
]
QUIET_RUN = ["--no-progress", "--no-tensorboard", "--sample_tokens", "0", "--eval_every", "0", "--diag_every", "0"]
# fmt: on
