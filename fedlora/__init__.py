"""fedlora: federated LoRA fine-tuning on Flower, from Python as from the `fedlora` command.

    import fedlora
    run = fedlora.simulate("simulations/quickstart.toml", out="runs/mine", overrides={"federation.rounds": 3})
    run.final_accuracy, run.history[-1], run.summary, run.run_dir
    model = fedlora.load_run("runs/mine").adapter_model()   # peft's model of the final adapter

`simulate`, `load_run` and `Run` live in fedlora/api.py, imported on first use so that
`import fedlora` stays cheap (no torch, Flower or Ray until they are asked for).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedlora.api import Run, load_run, simulate

__all__ = ["Run", "load_run", "simulate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fedlora import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")
