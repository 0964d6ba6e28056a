"""``diffv2 convert``: native checkpoint ↔ Hugging Face folder, and upcycling of Llama-style checkpoints.

    diffv2 convert runs/default --out hf/default            # native run/checkpoint dir → HF folder
    diffv2 convert hf/default --out runs/imported           # HF diffv2 folder → native run dir (step 0)
    diffv2 convert --from-llama path/to/llama --out hf/up   # Llama/Mistral/Qwen2 (HF) → DIFF V2, same function

Needs ``transformers`` (the ``hf`` extra); imported only when the command runs.
"""

from __future__ import annotations

import argparse

from ..errors import ConfigError, DiffV2Error


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between the native and the Hugging Face format, or upcycle a Llama-style model",
    )
    p.add_argument("src", nargs="?", help="a native run/checkpoint dir, or an HF diffv2 folder")
    p.add_argument(
        "--from-llama",
        metavar="HF_FOLDER",
        help="upcycle a Llama/Mistral/Qwen2-style HF folder (safetensors) into DIFF V2",
    )
    p.add_argument("--out", required=True, help="output folder (an HF folder, or a run dir for --to native)")
    p.add_argument(
        "--to", choices=("hf", "native"), help="output format (default: the other one for SRC, hf for --from-llama)"
    )
    p.add_argument(
        "--attention",
        choices=("diff_v2", "baseline"),
        default="diff_v2",
        help="--from-llama: DIFF V2 with a function-preserving start, or a plain baseline copy",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="--from-llama: context length of the converted model (default: the source's)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="weight dtype of an HF output (default float32; native output is always float32)",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if (args.src is None) == (args.from_llama is None):
        raise ConfigError("convert: give either SRC or --from-llama HF_FOLDER (exactly one)")
    try:
        from .. import hf  # transformers is heavy and optional: import it only for this command
    except ImportError as e:
        raise DiffV2Error(f"convert needs transformers>=5: pip install 'diffv2[hf]' ({e})") from None

    if args.from_llama is not None:
        return _upcycle(args, hf)
    to = args.to or ("native" if hf.is_hf_folder(args.src) else "hf")
    if to == "hf":
        if hf.is_hf_folder(args.src):
            raise ConfigError(f"--to hf: {args.src} is already an HF folder")
        out = hf.export_hf(args.src, args.out, dtype=args.dtype, force=args.force)
        print(f"wrote HF folder {out} (load with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))")
    else:
        if not hf.is_hf_folder(args.src):
            raise ConfigError(
                f"--to native: {args.src} is not an HF diffv2 folder (config.json with model_type 'diffv2')"
            )
        ckpt = hf.import_hf(args.src, args.out, force=args.force)
        print(f"wrote native checkpoint {ckpt}")
    return 0


def _upcycle(args: argparse.Namespace, hf) -> int:
    from ..hf.convert import check_out_dir, read_tokenizer_json, save_hf, save_native

    out = check_out_dir(args.out, args.force, args.from_llama)
    native = (args.to or "hf") == "native"
    tokenizer = None if native else _source_tokenizer(args.from_llama)  # a broken one fails before any work
    model, source = hf.upcycle(args.from_llama, attention=args.attention, max_seq_len=args.max_seq_len)
    if tokenizer is not None and len(tokenizer) > model.cfg.vocab_size:
        raise DiffV2Error(
            f"{args.from_llama}: the tokenizer has {len(tokenizer)} ids but config.json's vocab_size is "
            f"{model.cfg.vocab_size}; they belong to different models"
        )
    what = f"{source.get('model_type')} → {args.attention}"
    if native:
        try:
            text = read_tokenizer_json(args.from_llama)
            ckpt = save_native(model, out, tokenizer_json=text, source={"format": "hf", "path": args.from_llama})
        except ValueError as e:  # a tokenizer without an end-of-text token, or not one at all: keep the weights
            print(f"warning: tokenizer not copied ({e})")
            ckpt = save_native(model, out, source={"format": "hf", "path": args.from_llama})
        print(f"upcycled {what}: wrote native checkpoint {ckpt}")
        return 0
    ids = {k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if source.get(k) is not None}
    save_hf(hf.to_hf(model, **ids), out, tokenizer, args.dtype)
    print(f"upcycled {what}: wrote HF folder {out}")
    return 0


def _source_tokenizer(folder: str):
    """The source model's own HF tokenizer (chat template, bos/eos...); None, with a warning, when it has none."""
    from ..hf import read_hf_tokenizer

    tokenizer = read_hf_tokenizer(folder, vocab_size=None)  # read before the weights: checked against them after
    if tokenizer is None:
        print(f"warning: {folder} holds no tokenizer (tokenizer.json / tokenizer_config.json); none copied")
    return tokenizer
