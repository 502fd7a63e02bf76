"""Running ``monatune`` in the test process (imported by name: ``from run_cli import run_main``)."""
import torch

from monatune.cli import main


def run_main(*argv: object) -> int:
    """``monatune <argv>`` in this process, with one torch thread; returns the exit code.

    One thread as in the subprocesses (``subprocess_env``): the same arithmetic in both, and no
    slowdown from threads waiting on each other when the machine's cores are busy.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
