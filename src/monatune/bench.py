"""``monatune bench``: what a tuning method costs per training step, per inference, and in memory.

For a timm backbone (random weights, never downloaded) and a list of methods, each method is
measured in a fresh Python process (``python -m monatune.bench --worker SPEC``), so that the
peak resident set size of that process is the method's own and no method warms the caches or
the allocator of the next. A worker builds the model, applies the method, then times training
steps on one fixed random batch (forward, cross-entropy, backward, AdamW over the trainable
parameters, ``zero_grad``) and inference (``eval``, ``inference_mode``, forward only), each
figure the median of ``steps`` timed steps after ``warmup`` untimed ones. It prints one JSON
line. ``rounds`` repeats every method, in the same order each round, and a row reports the
median over rounds; ratios compare every row with the ``full`` row of the same run.

Memory is the process's peak resident set size after the training steps on CPU
(``getrusage``; the whole process: Python, torch, model, activations, gradients, optimizer
state), and ``torch.cuda.max_memory_allocated`` over the training steps on CUDA. The figure
right after the model was built is kept too; the difference is the training part.

``torch.utils.benchmark.Timer`` was considered for the timing: it synchronises CUDA and
picks repeat counts, but a training step changes the weights and the optimizer state, and a
per-step list of times is what the report keeps; a fresh process per method is not its job.

Example:
    >>> from monatune.bench import run_bench
    >>> result = run_bench("swin_tiny_patch4_window7_224", ["full", "mona"], batch_size=2, steps=3)
    >>> print(result.to_markdown())
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["run_bench", "BenchResult", "BenchRow", "WorkerError", "BENCH_METHODS", "PRECISIONS", "FROZEN_PRECISIONS"]

DEFAULT_BACKBONE = "swin_base_patch4_window7_224"
DEFAULT_METHODS = ("full", "mona", "mona-release", "fixed")
MONA_VARIANTS = {"mona-release": "release", "mona-plain": "plain"}  # pseudo-method -> Mona implementation
PRECISIONS = {"32": None, "bf16-mixed": "bfloat16", "16-mixed": "float16"}  # autocast dtype (Lightning's names)
FROZEN_PRECISIONS = {"bf16": "bfloat16", "fp16": "float16"}  # dtype of the frozen weights (monatune.memory)
RATIOS = {  # ratio to the full row -> the figure it divides
    "train_step": "train_step_s",
    "inference": "inference_s",
    "peak_mem": "peak_mem_mib",
    "step_mem": "step_mem_mib",
}


def _bench_methods() -> tuple[str, ...]:
    from .methods import METHODS

    return (*METHODS, *MONA_VARIANTS)


BENCH_METHODS = _bench_methods()


class WorkerError(RuntimeError):
    """A worker process failed; the message ends with the tail of its stderr."""


# ---------------------------------------------------------------- what one worker process does


def _build_model(spec: dict[str, Any]) -> Any:
    """The timm classifier of ``spec``; ``img_size`` follows the input size where the model takes one."""
    import timm

    kwargs = dict(spec["model_kwargs"])
    create = dict(pretrained=False, num_classes=spec["num_classes"])
    if "img_size" not in kwargs:
        try:
            return timm.create_model(spec["backbone"], **create, img_size=tuple(spec["input_size"]), **kwargs)
        except TypeError as e:  # a model without img_size (ResNet, ConvNeXt): it takes any size
            if "img_size" not in str(e):
                raise
    return timm.create_model(spec["backbone"], **create, **kwargs)


def _tune(model: Any, method: str, options: dict[str, Any]) -> None:
    """Apply a bench method (a monatune method or a Mona implementation variant)."""
    from .tuning import apply

    apply(model, "mona" if method in MONA_VARIANTS else method, **options)
    if method in MONA_VARIANTS:
        from .adapters.mona import set_mona_impl

        set_mona_impl(model, MONA_VARIANTS[method])


def _peak_rss_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _timed(fn: Callable[[], None], warmup: int, steps: int, sync: Callable[[], None]) -> tuple[float, list[float]]:
    """Seconds of the first call (compilation, lazy init) and of the ``steps`` calls after ``warmup``."""
    times = []
    for _ in range(warmup + steps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times[0], times[warmup:]


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one method in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(spec["seed"])  # the same backbone weights for every method
    model = _build_model(spec)
    _tune(model, spec["method"], spec["method_options"])
    memory_on = {"checkpointing": False, "frozen_precision": None}  # full fine-tuning has no frozen part
    if spec["method"] != "full" and (spec["checkpointing"] or spec["frozen_precision"]):
        from . import memory

        if spec["checkpointing"]:
            memory.set_activation_checkpointing(model, True)
            memory_on["checkpointing"] = True
        if spec["frozen_precision"]:
            memory.set_frozen_precision(model, getattr(torch, FROZEN_PRECISIONS[spec["frozen_precision"]]))
            memory_on["frozen_precision"] = spec["frozen_precision"]
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(spec["seed"] + 1)  # the same batch for every method
    height, width = spec["input_size"]
    images = torch.randn(spec["batch_size"], 3, height, width, generator=generator).to(device)
    labels = torch.randint(0, spec["num_classes"], (spec["batch_size"],), generator=generator).to(device)
    if spec["compile"]:
        model = torch.compile(model)  # compiled lazily: the first warm-up step pays for it
    dtype = PRECISIONS[spec["precision"]] and getattr(torch, PRECISIONS[spec["precision"]])  # None: no autocast
    scaler = torch.amp.GradScaler("cuda") if cuda and dtype == torch.float16 else None

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def train_step() -> None:
        with autocast():
            loss = F.cross_entropy(model(images).float(), labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer() -> None:
        with torch.inference_mode(), autocast():
            model(images)

    sync()
    built = {"rss_mib": _peak_rss_mib()}
    if cuda:
        built["cuda_mib"] = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    first_train, train_times = _timed(train_step, spec["warmup"], spec["steps"], sync)
    peak = {"rss_mib": _peak_rss_mib()}  # before inference, which could only add to it
    if cuda:
        peak["cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    model.eval()
    first_infer, infer_times = _timed(infer, spec["warmup"], spec["steps"], sync)
    kind = "cuda_mib" if cuda else "rss_mib"
    return {
        "train_step_s": statistics.median(train_times),
        "inference_s": statistics.median(infer_times),
        "model_mem_mib": built[kind],
        "peak_mem_mib": peak[kind],
        "first_train_step_s": first_train,
        "first_inference_s": first_infer,
        "train_times_s": train_times,
        "inference_times_s": infer_times,
        "rss_model_mib": built["rss_mib"],
        "rss_peak_mib": peak["rss_mib"],
        **memory_on,
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if cuda else None,
    }


def _run_worker(spec: dict[str, Any], label: str) -> dict[str, Any]:
    """Run :func:`_worker` in a fresh process; :class:`WorkerError` with its stderr tail if it fails."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])  # this monatune, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "monatune.bench", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with code {proc.returncode}"
    tail = "\n".join(f"  {line}" for line in proc.stderr.strip().splitlines()[-12:]) or "  (no output on stderr)"
    raise WorkerError(f"the worker for {label} {how}; its stderr ends with:\n{tail}")


# ---------------------------------------------------------------- the report


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


@dataclass
class BenchRow:
    """One method: parameter counts, the median over rounds of each figure, ratios to ``full``."""

    method: str
    trainable: int
    total: int
    method_options: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)  # each worker's output, in round order
    medians: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] | None = None  # method / full; None when the run has no full row

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def memory_options(self) -> str:
        first = self.rounds[0] if self.rounds else {}
        on = ["checkpointing"] if first.get("checkpointing") else []
        on += [f"frozen {first['frozen_precision']}"] if first.get("frozen_precision") else []
        return ", ".join(on) or "off"

    def summarise(self, batch_size: int) -> None:
        """Fill :attr:`medians` from :attr:`rounds` (throughput is the batch over the median time)."""
        keys = ("train_step_s", "inference_s", "model_mem_mib", "peak_mem_mib", "first_train_step_s")
        self.medians = {k: statistics.median(r[k] for r in self.rounds) for k in keys}
        self.medians["step_mem_mib"] = self.medians["peak_mem_mib"] - self.medians["model_mem_mib"]
        self.medians["train_images_per_s"] = batch_size / self.medians["train_step_s"]
        self.medians["inference_images_per_s"] = batch_size / self.medians["inference_s"]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "trainable_percent": self.trainable_percent}


@dataclass
class BenchResult:
    """What :func:`run_bench` measured: one row per method, the settings, the machine, the command."""

    rows: list[BenchRow]
    config: dict[str, Any]
    env: dict[str, Any]
    command: str  # a ``monatune bench`` command line that repeats this run

    def row(self, method: str) -> BenchRow:
        return next(r for r in self.rows if r.method == method)

    def to_dict(self) -> dict[str, Any]:
        rows = [r.to_dict() for r in self.rows]
        return {"command": self.command, "env": self.env, "config": self.config, "rows": rows}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        c, e = self.config, self.env
        height, width = c["input_size"]
        options = [f"precision {c['precision']}"]
        options += ["activation checkpointing"] if c["checkpointing"] else []
        options += [f"frozen weights in {c['frozen_precision']}"] if c["frozen_precision"] else []
        options += ["torch.compile"] if c["compile"] else []
        options += [f"{k}={v}" for k, v in c["method_options"].items()]
        device = f"{e['device']} ({e['device_name']})"
        memory = "CUDA max_memory_allocated" if e["device"] == "cuda" else "peak RSS of the worker process"
        lines = [
            f"# monatune bench: {c['backbone']}",
            "",
            f"- **Date:** {e['date']}; torch {e['torch']}, timm {e['timm']}, monatune {e['monatune']}, "
            f"Python {e['python']}",
            f"- **Device:** {device}; torch threads: {e['threads']}, CPUs: {e['cpu_count']}",
            f"- **Run:** batch {c['batch_size']}, input {height}×{width}, {', '.join(options)}; "
            f"median of {c['steps']} timed steps after {c['warmup']} warm-up, {c['rounds']} round(s)",
            f"- **Memory:** {memory}",
            f"- **Command:** `{self.command}`",
            "",
        ]
        header = ["method", "trainable", "trainable %", "train step ms", "train img/s", "inference ms"]
        header += ["inference img/s", "peak MiB", "after build MiB", "training part MiB"]
        header += ["step / full", "inference / full", "peak mem / full", "training part / full"]
        show_memory = c["checkpointing"] or c["frozen_precision"]
        header += ["memory options"] if show_memory else []
        header += ["first step s"] if c["compile"] else []
        align = ["---"] + ["---:"] * (len(header) - 1)
        align[header.index("memory options") if show_memory else 0] = "---"
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        for r in self.rows:
            m, q = r.medians, r.ratios or {}
            cells = [r.method, f"{r.trainable:,}", _fmt(r.trainable_percent, 2)]
            cells += [_fmt(1e3 * m["train_step_s"], 2), _fmt(m["train_images_per_s"], 1)]
            cells += [_fmt(1e3 * m["inference_s"], 2), _fmt(m["inference_images_per_s"], 1)]
            cells += [_fmt(m["peak_mem_mib"], 0), _fmt(m["model_mem_mib"], 0), _fmt(m["step_mem_mib"], 0)]
            cells += [_fmt(q.get(k), 2) for k in ("train_step", "inference", "peak_mem", "step_mem")]
            cells += [r.memory_options] if show_memory else []
            cells += [_fmt(m["first_train_step_s"], 2)] if c["compile"] else []
            lines.append("| " + " | ".join(cells) + " |")
        if not any(r.ratios for r in self.rows):
            lines += ["", "No `full` row in this run: the ratio columns are empty."]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``bench.json`` and ``bench.md`` into ``out_dir`` (created if needed; nothing else is touched)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(self.to_json() + "\n")
        (out / "bench.md").write_text(self.to_markdown())
        return out / "bench.json", out / "bench.md"


# ---------------------------------------------------------------- checks and the run


def _input_size(size: int | Sequence[int]) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in hw):
        raise ValueError(f"`input_size` must be a positive int or (height, width), got {size!r}")
    return hw  # type: ignore[return-value]


def _check_backbone(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*swin*')"
        raise ValueError(f"unknown timm backbone {name!r}{hint}")


def _options_for(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method options that ``method`` takes (``bottleneck=32`` goes to mona and adapter, not to fixed)."""
    from .methods import METHODS

    cls = METHODS["mona" if method in MONA_VARIANTS else method]
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in options.items() if k in names}


def _environment(device: str) -> dict[str, Any]:
    import timm
    import torch

    from ._version import __version__

    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):  # not Linux
        pass
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "monatune": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": cpu,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
    }


def _command(config: dict[str, Any]) -> str:
    c = config
    args = ["monatune", "bench", "--backbone", c["backbone"], "--methods", ",".join(c["methods"])]
    args += ["--batch-size", str(c["batch_size"]), "--input-size", "x".join(map(str, c["input_size"]))]
    args += ["--device", c["device"], "--steps", str(c["steps"]), "--warmup", str(c["warmup"])]
    args += ["--rounds", str(c["rounds"])]
    args += ["--threads", str(c["threads"])] if c["threads"] else []
    args += ["--num-classes", str(c["num_classes"])]
    args += ["--model-kwargs", json.dumps(c["model_kwargs"])] if c["model_kwargs"] else []
    for key, value in c["method_options"].items():
        value = list(value) if isinstance(value, tuple) else value
        args += ["--method-option", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    args += ["--precision", c["precision"]]
    args += ["--checkpointing"] if c["checkpointing"] else []
    args += ["--frozen-precision", c["frozen_precision"]] if c["frozen_precision"] else []
    args += ["--compile"] if c["compile"] else []
    return shlex.join(args)


def run_bench(
    backbone: str = DEFAULT_BACKBONE,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    batch_size: int = 4,
    input_size: int | Sequence[int] = 224,
    device: str = "auto",
    steps: int = 5,
    warmup: int = 2,
    rounds: int = 1,
    threads: int | None = None,
    num_classes: int = 1000,
    model_kwargs: dict[str, Any] | None = None,
    method_options: dict[str, Any] | None = None,
    precision: str = "32",
    checkpointing: bool = False,
    frozen_precision: str | None = None,
    compile_model: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Measure training-step time, inference time, peak memory and trainable parameters per method.

    Every setting is checked, and every method applied once to the model on the meta device,
    before the first worker starts; then each method of each round runs in its own process.

    Args:
        backbone: timm model name (built with ``pretrained=False``: nothing is downloaded).
        methods: Names from ``monatune.METHODS``, or ``mona-release`` / ``mona-plain`` (Mona
            with the release's structure / with plain autograd operations).
        batch_size: Images per step.
        input_size: Side of the square input, or ``(height, width)``. Passed to timm as
            ``img_size`` when the model takes one and ``model_kwargs`` does not set it.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
        steps: Timed steps; each figure is their median.
        warmup: Untimed steps before them (with ``compile_model``, at least 1: it compiles).
        rounds: Repeats of all methods, in the same order; a row is the median over rounds.
        threads: ``torch.set_num_threads`` in the workers; None keeps torch's default.
        num_classes: Classes of the model's head (the labels are random).
        model_kwargs: More ``timm.create_model`` arguments, e.g. ``{"depths": [2, 2, 6, 2]}``.
        method_options: Method options (``{"bottleneck": 32}``), given to each method that has them.
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"``: the step under ``torch.autocast``
            (with a ``GradScaler`` for 16-mixed on CUDA).
        checkpointing: Activation checkpointing (``monatune.memory``), for every method but ``full``.
        frozen_precision: ``"bf16"`` or ``"fp16"``: the frozen weights in that dtype
            (``monatune.memory``), for every method but ``full``.
        compile_model: ``torch.compile`` the model; the first warm-up step compiles.
        seed: Seed of the backbone's weights and of the batch (the same for every method).
        progress: Called with a line after each worker, e.g. ``print``.

    Returns:
        A :class:`BenchResult`; ``to_markdown()``, ``to_json()``, ``save(dir)``.
    """
    import torch

    methods = list(methods)
    unknown = [m for m in methods if m not in BENCH_METHODS]
    if unknown or not methods:
        what = f"unknown bench method(s) {unknown}" if unknown else "no methods given"
        raise ValueError(f"{what}; choose from {', '.join(BENCH_METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"each method once, please; got {methods}")
    counts = {"batch_size": (batch_size, 1), "steps": (steps, 1), "warmup": (warmup, 0), "rounds": (rounds, 1)}
    for name, (value, least) in {**counts, "num_classes": (num_classes, 1)}.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"`{name}` must be an int of at least {least}, got {value!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"`threads` must be a positive int or None, got {threads!r}")
    if compile_model and warmup < 1:
        raise ValueError("with torch.compile, `warmup` must be at least 1 (the first step compiles), got 0")
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {list(PRECISIONS)}, got {precision!r}")
    if frozen_precision is not None and frozen_precision not in FROZEN_PRECISIONS:
        allowed = list(FROZEN_PRECISIONS)
        raise ValueError(f"`frozen_precision` must be None or one of {allowed}, got {frozen_precision!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"`device` must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device; use --device cpu")
    if checkpointing or frozen_precision:
        try:
            from . import memory
        except ImportError as e:
            raise ValueError(f"checkpointing and frozen precision need monatune.memory, which is missing: {e}") from e
        if not all(hasattr(memory, f) for f in ("set_activation_checkpointing", "set_frozen_precision")):
            raise ValueError("this monatune.memory lacks set_activation_checkpointing or set_frozen_precision")
    model_kwargs = dict(model_kwargs or {})
    method_options = dict(method_options or {})
    _check_backbone(backbone)
    config = {
        "backbone": backbone,
        "methods": methods,
        "batch_size": batch_size,
        "input_size": list(_input_size(input_size)),
        "device": device,
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "threads": threads,
        "num_classes": num_classes,
        "model_kwargs": model_kwargs,
        "method_options": method_options,
        "precision": precision,
        "checkpointing": checkpointing,
        "frozen_precision": frozen_precision,
        "compile": compile_model,
        "seed": seed,
    }
    unused = set(method_options) - {k for m in methods if m != "full" for k in _options_for(m, method_options)}
    if unused:
        raise ValueError(f"no method in {methods} takes the option(s) {sorted(unused)}")

    from .params import count_parameters

    rows = []
    for method in methods:  # fail here, not in the n-th worker: build and tune each on the meta device
        options = _options_for(method, method_options) if method != "full" else {}
        with torch.device("meta"):
            try:
                model = _build_model(config)
            except (TypeError, RuntimeError) as e:
                raise ValueError(f"timm.create_model({backbone!r}, **{model_kwargs}) failed: {e}") from e
            _tune(model, method, options)
        report = count_parameters(model)
        rows.append(BenchRow(method, report.trainable, report.total, options))

    for r in range(rounds):
        for row in rows:
            spec = {**config, "method": row.method, "method_options": row.method_options}
            start = time.perf_counter()
            out = _run_worker(spec, f"{row.method!r} (round {r + 1} of {rounds})")
            row.rounds.append(out)
            if progress is not None:
                progress(
                    f"round {r + 1}/{rounds} {row.method}: train step {1e3 * out['train_step_s']:.1f} ms, "
                    f"inference {1e3 * out['inference_s']:.1f} ms, peak {out['peak_mem_mib']:.0f} MiB "
                    f"({time.perf_counter() - start:.1f} s)"
                )
    for row in rows:
        row.summarise(batch_size)
    full = next((row for row in rows if row.method == "full"), None)
    if full is not None:
        for row in rows:
            row.ratios = {k: row.medians[v] / full.medians[v] if full.medians[v] else None for k, v in RATIOS.items()}
    env = _environment(device)
    first = rows[0].rounds[0]
    env["threads"] = first["threads"]
    if device == "cuda":
        env["device_name"] = first["device_name"]
    return BenchResult(rows, config, env, _command(config))


def _worker_main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m monatune.bench --worker SPEC (run by `monatune bench`; use that)", file=sys.stderr)
        return 2
    print(json.dumps(_worker(json.loads(argv[1]))))
    return 0


if __name__ == "__main__":  # a worker process of run_bench
    sys.exit(_worker_main(sys.argv[1:]))
