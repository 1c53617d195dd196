"""Flower's deployment processes, run so that they end when their work does.

flwr 1.41's `flower-supernode` serves its local Runtime API from a thread that is not a daemon:
when its main thread fails (an unreadable certificate, a SuperLink that refuses it), the process
prints the traceback and then waits for that thread forever. Run through `run_to_the_end`, the
process ends with the main function's exit status whatever threads are left; the SuperExec it
started watches its parent's pid and ends too.

    python -m fedlora.flower_process flower-supernode ARGS...   (what `fedlora deploy supernode` runs)
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

INTERRUPTED = 130  # as a shell reports a process ended by SIGINT


def run_to_the_end(main: Callable[[], object]) -> NoReturn:
    """Call `main`, then end the process at once with its exit status (0, SystemExit's code, 1
    after an exception, 130 after Ctrl-C), output flushed."""
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if done.code is not None and not isinstance(done.code, int):
            print(done.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = INTERRUPTED
    except BaseException:  # a failure of Flower's own: its traceback, then the end
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def flower_supernode() -> None:
    """flwr's `flower-supernode`, with the arguments after the command name."""
    from flwr.supernode.cli.flower_supernode import flower_supernode as flower_main

    flower_main()


COMMANDS: dict[str, Callable[[], None]] = {"flower-supernode": flower_supernode}


def main() -> NoReturn:
    """`python -m fedlora.flower_process COMMAND ARGS...`: run a Flower command to the end."""
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m fedlora.flower_process {{{','.join(COMMANDS)}}} ARGS...", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = sys.argv[1:]  # flwr's parser reads sys.argv, its program name first
    run_to_the_end(COMMANDS[sys.argv[0]])


if __name__ == "__main__":
    main()
