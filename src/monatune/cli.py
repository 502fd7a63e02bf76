"""The ``monatune`` command: thin wrappers over the library."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

__all__ = ["main"]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"method options are KEY=VALUE (e.g. bottleneck=32), got {pair!r}")
        value = _parse_value(value)
        options[key] = tuple(value) if isinstance(value, list) else value
    return options


def _cmd_params(args: argparse.Namespace) -> int:
    import torch

    from .dense import build_dense_backbone
    from .params import count_parameters

    with torch.device("meta"):  # counting needs shapes only
        model = build_dense_backbone(args.name, args.method, **_options(args.option))
    report = count_parameters(model)
    print(json.dumps(report.to_dict()) if args.json else report)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    run_demo(args.out, methods=methods, epochs=args.epochs, cache=args.cache, seed=args.seed, progress=not args.quiet)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoints.release import convert_release_checkpoint

    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    out = convert_release_checkpoint(
        args.checkpoint, args.out, args.model, method=args.method, model_kwargs=kwargs, allow_pickle=args.allow_pickle
    )
    print(f"wrote {args.method} adapter of {args.model} to {out}")
    return 0


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _lightning(argv: list[str]) -> int:
    from .engine.cli import run_lightning_cli

    try:
        run_lightning_cli(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"monatune {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monatune", description="Mona-tuning of timm vision backbones.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in LIGHTNING_COMMANDS:  # listed for --help; parsed by LightningCLI (see monatune.engine.cli)
        sub.add_parser(name, help=f"{name} a task from YAML configs (monatune {name} --help)", add_help=False)

    p = sub.add_parser(
        "demo", help="pretrain a small Swin (once, cached), transfer it to handwritten digits with five methods"
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--methods", default="full,fixed,lora,adapter,mona", help="comma-separated (default: all five)")
    p.add_argument("--epochs", type=int, default=6, help="transfer epochs per method (default: 6)")
    p.add_argument("--cache", default=None, help="where the pretrained Swin is cached (default: ~/.cache/monatune)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("params", help="parameter counts of a timm backbone (dense-prediction form) under a method")
    p.add_argument("name", help="timm model name, e.g. swin_base_patch4_window7_224")
    p.add_argument("--method", default="mona", help="tuning method (default: mona)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE", help="a method option")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("convert", help="write a checkpoint trained with the Mona release as a monatune adapter")
    p.add_argument("checkpoint", help="the release's .pth (OpenMMLab layout: my_module_1/2, qkv.lora_A/B, ...)")
    p.add_argument("--method", default="mona", help="method it was trained with (default: mona)")
    p.add_argument("out", help="adapter directory to write")
    p.add_argument("--model", required=True, help="timm architecture it was trained on, e.g. swin_base_patch4_window7_224")
    p.add_argument("--model-kwargs", metavar="JSON", help='extra timm.create_model arguments, e.g. \'{"depths": [2, 2, 6, 2]}\'')
    p.add_argument("--allow-pickle", action="store_true", help="allow a full unpickle (runs code in the file)")
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return _lightning(argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # json.JSONDecodeError is a ValueError
        print(f"monatune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
