"""The ``monatune`` command: thin wrappers over the library."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any, Callable, Sequence

__all__ = ["main"]


def _parse_value(text: str) -> Any:
    """A ``-o KEY=VALUE`` value: JSON, else YAML (as in the configs); ``(3, 5)`` and ``3,5`` are lists too."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    import yaml

    flow = text.strip()
    if not flow:
        return text
    if flow.startswith("(") and flow.endswith(")"):  # a Python tuple, as people write one
        flow = f"[{flow[1:-1]}]"
    elif "," in flow and not flow.startswith(("[", "{", "'", '"')):  # 3,5 or q,v
        flow = f"[{flow}]"
    return yaml.safe_load(flow)  # safe_load builds plain values only; YAMLError for an unbalanced [ or quote


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    """Method options from ``-o KEY=VALUE`` pairs; the method checks the values (``monatune.methods``)."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"method options are KEY=VALUE (e.g. bottleneck=32), got {pair!r}")
        try:
            value = _parse_value(text)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or " ".join(str(e).split())  # YAML's own words, without its context
            raise ValueError(
                f"-o {key}: {text!r} is not a value JSON or YAML can read ({problem}); write a number, "
                "true/false, a name, or a list such as [3, 5] or 3,5"
            ) from None
        options[key] = tuple(value) if isinstance(value, list) else value
    return options


def _at_least(least: int) -> Callable[[str], int]:
    """An argparse ``type``: an int of at least ``least`` (``--epochs -1`` would train forever)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"must be an int of at least {least}, got {text!r}")
        return value

    return parse


def _json_object(option: str, text: str | None) -> dict[str, Any] | None:
    """The JSON object given to ``option`` (e.g. ``--model-kwargs``); None when it was not given."""
    example = 'e.g. \'{"depths": [2, 2, 6, 2]}\''
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{option} is not valid JSON ({e}): {text!r}; give a JSON object, {example}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object, {example}; got {text!r}")
    return value


def _cmd_params(args: argparse.Namespace) -> int:
    if bool(args.config) == bool(args.name):
        raise ValueError("give a timm name (monatune params swin_base_patch4_window7_224) or experiment configs "
                         "(monatune params -c configs/det/voc_retinanet_swin_l.yaml -c configs/methods/mona.yaml)")
    if args.config:
        return _params_of_configs(args)
    if args.num_classes is not None:
        raise ValueError("--num-classes goes with -c CONFIG; a timm name is counted as a dense backbone, without classes")
    import torch

    from .models.dense import build_dense_backbone
    from .methods import resolve_method
    from .params import count_parameters

    method, options = args.method or "mona", _options(args.option)
    resolve_method(method, options)  # an unknown method, option or value: say so before building anything
    with torch.device("meta"):  # counting needs shapes only
        model = build_dense_backbone(args.name, method, **options)
    report = count_parameters(model)
    print(json.dumps(report.to_dict()) if args.json else report)
    return 0


def _params_of_configs(args: argparse.Namespace) -> int:
    from .params import count_config_parameters

    init_args: dict[str, Any] = {}
    if args.method is not None:
        init_args["method"] = args.method
    if args.option:
        init_args["method_options"] = _options(args.option)
    report = count_config_parameters(args.config, num_classes=args.num_classes, init_args=init_args)
    print(json.dumps(report.to_dict()) if args.json else report)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError(f"--methods names no method, got {args.methods!r}; give some of full,fixed,lora,adapter,mona")
    run_demo(args.out, methods=methods, epochs=args.epochs, cache=args.cache, seed=args.seed, progress=not args.quiet)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoints.release import convert_release_checkpoint

    kwargs = _json_object("--model-kwargs", args.model_kwargs)
    out = convert_release_checkpoint(
        args.checkpoint, args.out, args.model, method=args.method, model_kwargs=kwargs, allow_pickle=args.allow_pickle
    )
    print(f"wrote {args.method} adapter of {args.model} to {out}")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from .data.oriented import DOTA_CLASSES, STAR_CLASSES
    from .data.split import PRESETS, split_images

    settings = dict(PRESETS[args.preset])
    for key in ("sizes", "gaps", "rates"):
        if getattr(args, key):
            settings[key] = tuple(getattr(args, key))
    classes = None
    if args.classes:
        named = {"dota": DOTA_CLASSES, "star": STAR_CLASSES}
        classes = named.get(args.classes.lower()) or [c.strip() for c in args.classes.split(",") if c.strip()]
    s = split_images(
        args.sources, args.out, **settings, img_rate_thr=args.img_rate_thr, iof_thr=args.iof_thr,
        padding_value=args.padding_value, save_ext=args.save_ext, workers=args.workers, progress=not args.quiet,
        classes=classes,
    )  # fmt: skip
    print(f"split {s.images} image(s) into {s.patches} patches in {args.out} ({s.objects_kept} objects in patches, "
          f"{s.objects_dropped} in none); {s.already_done} already done")  # fmt: skip
    notes = [(s.objects_other_class, "objects of other classes left out"),
             (s.bad_lines, "malformed annotation lines skipped"),
             (s.images_without_labels, "images without a label file (no objects)")]  # fmt: skip
    for count, what in notes:
        if count:
            print(f"  {count} {what}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import WorkerError, run_bench

    kwargs = _json_object("--model-kwargs", args.model_kwargs)
    height, sep, width = args.input_size.lower().partition("x")
    if not (height.isdigit() and (width.isdigit() or not sep)):
        raise ValueError(f"--input-size is a side or HxW (224, 224x320), got {args.input_size!r}")
    try:
        result = run_bench(
            args.backbone,
            [m.strip() for m in args.methods.split(",") if m.strip()],
            batch_size=args.batch_size,
            input_size=(int(height), int(width or height)),
            device=args.device,
            steps=args.steps,
            warmup=args.warmup,
            rounds=args.rounds,
            threads=args.threads,
            num_classes=args.num_classes,
            model_kwargs=kwargs,
            method_options=_options(args.method_option),
            precision=args.precision,
            checkpointing=args.checkpointing,
            frozen_precision=args.frozen_precision,
            compile_model=args.compile,
            progress=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
        )
    except WorkerError as e:
        print(f"monatune bench: error: {e}", file=sys.stderr)
        return 2
    print(result.to_json() if args.json else result.to_markdown().rstrip("\n"))
    if args.output:
        json_path, md_path = result.save(args.output)
        if not args.quiet:
            print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .deploy import ExportCheckError, export_model

    height, sep, width = (args.image_size or "").lower().partition("x")
    if args.image_size and not (height.isdigit() and (width.isdigit() or not sep)):
        raise ValueError(f"--image-size is a side or HxW (224, 512x640), got {args.image_size!r}")
    try:
        info = export_model(
            args.source, args.out, pretrained=args.pretrained, configs=args.config, adapter_choice=args.adapter_choice,
            model_kwargs=_json_object("--model-kwargs", args.model_kwargs), features=args.features,
            image_size=(int(height), int(width or height)) if args.image_size else None,
            dynamic_size={"auto": None, "yes": True, "no": False}[args.dynamic_size], batch_size=args.batch_size,
            tolerance=args.tolerance, runs=args.runs,
        )  # fmt: skip
    except ExportCheckError as e:
        print(f"monatune export: check failed: {e}", file=sys.stderr)
        return 1
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in info["timing"]["ratio_to_eager"].items() if k != "eager")
    print(f"wrote {args.out}/model.pt2, model.onnx and export.json ({info['task']}; dynamic image size: "
          f"{info['dynamic']['image_size']}); max relative error {info['check']['max_relative_error']:.2g}; "
          f"time against eager PyTorch: {ratios}")  # fmt: skip
    return 0


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _lightning(argv: list[str]) -> int:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from .engine.cli import run_lightning_cli

    try:
        run_lightning_cli(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"monatune {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except SIGTERMException as e:  # a SystemExit without a status: a stopped job must not pass for a finished one
        signum = getattr(e, "signal", signal.SIGTERM)
        name = signal.Signals(signum).name
        if argv[0] == "fit":
            hint = (f"its state after step {getattr(e, 'step', '?')} is in checkpoints/last.ckpt; "
                    "continue with the same command and --resume")  # fmt: skip
        else:
            hint = "nothing was written; run it again"
        print(f"monatune {argv[0]}: stopped by {name}; {hint}", file=sys.stderr)
        return 128 + signum
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
    p.add_argument("--epochs", type=_at_least(1), default=6, help="transfer epochs per method (default: 6)")
    p.add_argument("--cache", default=None, help="where the pretrained Swin is cached (default: ~/.cache/monatune)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "params",
        help="parameter counts: of a timm backbone (dense-prediction form) under a method, or of the task model "
        "experiment configs describe (-c CONFIG [-c METHOD.yaml]), by part",
    )
    p.add_argument("name", nargs="?", help="timm model name, e.g. swin_base_patch4_window7_224")
    p.add_argument("--config", "-c", action="append", default=[], metavar="CONFIG",
                   help="an experiment YAML file, as `monatune fit -c` takes (repeat: later files win)")  # fmt: skip
    p.add_argument("--method", default=None, help="tuning method (default: mona, or the config's)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE", help="a method option")
    p.add_argument(
        "--num-classes", type=_at_least(1), help="with -c: the class count (default: the config's or its data's)"
    )
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

    p = sub.add_parser("split", help="cut DOTA-format images into the release's patches (DOTA devkit / mmrotate img_split)")
    p.add_argument("sources", nargs="+", help="folders with images/ and labelTxt/ (or annfiles/); images only for a test set")
    p.add_argument("out", help="output folder (images/, annfiles/); rerun to finish an interrupted split")
    p.add_argument("--preset", choices=("ss", "ms"), default="ss",
                   help="ss: 1024 windows, gap 200, rate 1; ms: gap 500, rates 0.5, 1, 1.5 (default: ss)")  # fmt: skip
    p.add_argument("--sizes", "--size", type=int, nargs="+", help="window sizes (default: the preset's)")
    p.add_argument("--gaps", "--gap", type=int, nargs="+", help="window overlaps, one per size (default: the preset's)")
    p.add_argument("--rates", "--rate", type=float, nargs="+", help="window scales: size / rate (default: the preset's)")
    p.add_argument("--img-rate-thr", type=float, default=0.6, help="least share of a window inside the image (0.6)")
    p.add_argument("--iof-thr", type=float, default=0.7, help="least share of an object inside a window (0.7)")
    p.add_argument("--padding-value", type=int, nargs=3, default=(124, 116, 104), metavar=("R", "G", "B"),
                   help="colour of windows past a small image (default: 124 116 104, mmrotate's BGR 104 116 124)")  # fmt: skip
    p.add_argument("--save-ext", choices=(".png", ".jpg", ".bmp", ".tif"), default=".png", help="patch format (.png)")
    p.add_argument("--classes", help="keep only these classes: dota, star or a comma-separated list (default: all)")
    p.add_argument("--workers", type=_at_least(1), default=1, help="processes (default: 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_split)

    p = sub.add_parser("bench", help="training-step and inference time, peak memory, trainable parameters per method")
    p.add_argument("--backbone", default="swin_base_patch4_window7_224", help="timm model (default: Swin-B)")
    p.add_argument(
        "--methods", default="full,mona,mona-release,fixed", help="comma-separated; also mona-release, mona-plain"
    )
    p.add_argument("--batch-size", type=int, default=4, help="(default: 4)")
    p.add_argument("--input-size", default="224", metavar="SIZE", help="a side or HxW (default: 224)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="default: cuda when available")
    p.add_argument("--steps", type=int, default=5, help="timed steps, median reported (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default: 2)")
    p.add_argument("--rounds", type=int, default=1, help="repeats of all methods, median reported (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--num-classes", type=int, default=1000, help="(default: 1000)")
    p.add_argument("--model-kwargs", metavar="JSON", help='extra timm.create_model arguments, e.g. \'{"depths": [2, 2, 6, 2]}\'')
    p.add_argument("--method-option", "-o", action="append", default=[], metavar="KEY=VALUE", help="a method option")
    p.add_argument("--precision", choices=("32", "bf16-mixed", "16-mixed"), default="32", help="autocast (default: 32)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (not for full)")
    p.add_argument("--frozen-precision", choices=("bf16", "fp16"), help="frozen weights in this dtype (not for full)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the warm-up compiles)")
    p.add_argument("--output", metavar="DIR", help="also write DIR/bench.json and DIR/bench.md")
    p.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("export", help="a trained run (or adapter + pretrained file) as model.pt2 and model.onnx, "
                       "checked against eager PyTorch and timed (export.json)")  # fmt: skip
    p.add_argument("source", help="a run directory (runs/<name>/) or an adapter directory")
    p.add_argument("out", help="output folder (new, empty, or an earlier export)")
    p.add_argument("--pretrained", help="pretrained weights file (an adapter directory needs it; replaces a run's)")
    p.add_argument("--config", "-c", action="append", default=[], metavar="CONFIG",
                   help="task config of an adapter directory (a detector's or segmenter's adapter needs it)")  # fmt: skip
    p.add_argument("--adapter_choice", "--adapter-choice", choices=("best", "last"), default="best",
                   help="a run's adapter-best/ (default) or adapter-last/")  # fmt: skip
    p.add_argument("--model-kwargs", metavar="JSON", help="extra timm.create_model arguments (an adapter directory alone)")
    p.add_argument("--image-size", metavar="SIZE", help="export size, a side or HxW (default: the task's evaluation size)")
    p.add_argument("--features", action="store_true", help="detectors: export the backbone and FPN (a whole detector cannot be)")
    p.add_argument("--dynamic-size", choices=("auto", "yes", "no"), default="auto",
                   help="symbolic image height and width (auto: where the backbone captures them)")  # fmt: skip
    p.add_argument("--batch-size", type=_at_least(2), default=2, help="export sample and timing batch (default: 2)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest relative error the check passes (1e-4)")
    p.add_argument("--runs", type=_at_least(1), default=5, help="timed runs per form, median reported (default: 5)")
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            return _lightning(argv)
        args = build_parser().parse_args(argv)
        try:
            return args.func(args)
        except (ValueError, FileNotFoundError) as e:  # json.JSONDecodeError is a ValueError
            print(f"monatune {args.command}: error: {e}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print(f"\nmonatune {argv[0] if argv else ''}: interrupted (Ctrl-C)", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
