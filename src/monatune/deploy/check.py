"""The export's self-check: the written files against eager PyTorch, and their speed side by side.

:func:`check_outputs` runs ``model.pt2`` (``torch.export.load``) and ``model.onnx`` (ONNX Runtime's CPU
provider) on random inputs and compares each output with the eager network's: the error of an
output is ``max |exported - eager| / max |eager|`` (one number per output, scale-free, and not blown up
by the near-zero entries that an element-wise relative error divides by). :func:`time_forms` times
every form on the same input in one process, round-robin (each round runs each form once), after a
few warm-up runs, and reports the median; :func:`machine` says where that ran.
"""
from __future__ import annotations

import datetime
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["relative_error", "onnx_session", "check_outputs", "time_forms", "machine"]


def relative_error(found: Tensor, expected: Tensor) -> float:
    """``max |found - expected| / max |expected|`` (the absolute error where ``expected`` is all zeros)."""
    found, expected = found.detach().double(), expected.detach().double()
    if found.shape != expected.shape:
        return float("inf")
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (found - expected).abs().max().item() if expected.numel() else 0.0
    return error / scale if scale > 0 else error


def onnx_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session of ``path`` with ``threads`` intra-op threads (as torch's)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _as_tuple(out: Any) -> tuple[Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_outputs(
    eager: nn.Module, program: nn.Module, session: Any, shapes: Sequence[tuple[int, ...]], tolerance: float
) -> dict[str, Any]:
    """Compare the .pt2 module and the ONNX session with ``eager`` on random inputs of each shape."""
    cases = []
    generator = torch.Generator().manual_seed(0)
    name = session.get_inputs()[0].name
    for shape in shapes:
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = _as_tuple(eager(x))
        case: dict[str, Any] = {"input_shape": list(shape)}
        runners = {"pt2": lambda: _as_tuple(program(x)),
                   "onnx": lambda: [torch.from_numpy(a) for a in session.run(None, {name: x.numpy()})]}  # fmt: skip
        for form, run in runners.items():
            try:
                with torch.no_grad():
                    found = run()
            except Exception as e:  # noqa: BLE001  (a guard of the captured program, ONNX Runtime's errors): a failure
                case[f"{form}_max_relative_error"] = float("inf")
                case[f"{form}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                continue
            errors = [relative_error(f, e) for f, e in zip(found, expected)]
            case[f"{form}_max_relative_error"] = max(errors) if len(found) == len(expected) else float("inf")
        cases.append(case)
    worst = max(max(c["pt2_max_relative_error"], c["onnx_max_relative_error"]) for c in cases)
    return {
        "passed": worst <= tolerance,
        "tolerance": tolerance,
        "error": "max |exported - eager| / max |eager| per output, the largest over the outputs; eager is the "
        "unfolded tuned network in eval mode",
        "max_relative_error": worst,
        "cases": cases,
    }


def time_forms(forms: dict[str, Callable[[], Any]], *, warmup: int, runs: int) -> dict[str, Any]:
    """Median seconds per call of each form (``name -> no-argument call``), measured round-robin, and
    the ratio of each to the first form's."""
    for _ in range(warmup):
        for call in forms.values():
            call()
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(runs):
        for name, call in forms.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    first = next(iter(median.values()))
    return {
        "warmup": warmup,
        "runs": runs,
        "median_seconds": median,
        "ratio_to_eager": {name: m / first for name, m in median.items()},
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine and the versions that the timings and the check ran with, and the date (UTC)."""
    import onnx
    import onnxruntime
    import onnxscript
    import timm

    from .._version import __version__

    return {
        "cpu": _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"monatune": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
                     "onnxruntime": onnxruntime.__version__},  # fmt: skip
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
