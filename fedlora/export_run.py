"""`fedlora export RUN_DIR --to DIR`: a finished run's adapter as a folder of its own, or its merged model.

The adapter (default): the folder fedlora/export.py describes, its base's files copied from the
run's `adapter/base` (not linked: an export is the user's to change), so that it loads wherever
DIR is copied.
A run written before the base carried its head gets the head as a shard of its own, so that no
weight loads as newly initialized.

`--merged`: the LoRA factors folded into the base (peft's merge_and_unload; the classification
head and the run's labels included) and saved as a plain transformers model with its tokenizer
(and, for a causal LM, the chat template training used): `AutoModelFor...from_pretrained(DIR)`
and `pipeline(..., model=DIR)` load it, no peft needed.

Either is written beside DIR and renamed into place: never half a folder. Bad input (not a run,
no adapter, DIR not empty without --overwrite, DIR holding the run) is refused in one line.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from fedlora.config import ConfigError, ExperimentConfig, config_from_json
from fedlora.export import (
    ADAPTER_CONFIG,
    BASE_DIR,
    BASE_REFERENCE,
    CARD,
    MODEL_CONFIG,
    adapter_head,
    carry_base,
    declare_task,
    link_weights,
    tensor_names,
    weight_files,
    write_adapter,
    write_folder,
)
from fedlora.export_card import LOADING, loading_section
from fedlora.model import quiet_transformers, task_kind
from fedlora.results import ADAPTER, CONFIG


def export_run(run_dir: Path, to: Path, merged: bool = False, overwrite: bool = False) -> Path:
    """Write the run's adapter (or, `merged`, its merged model) into `to`; returns `to`."""
    run_dir = Path(run_dir)
    adapter = _checked_adapter(run_dir)
    _check_destination(Path(to), run_dir, overwrite)
    to = Path(to).resolve()  # "." has no name to write a partial folder beside
    config = config_from_json((run_dir / CONFIG).read_bytes(), run_dir / CONFIG)
    model = load_run_model(adapter, config)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    card = _card(adapter, config, merged, carries_base=merged or _carried(adapter))
    to.parent.mkdir(parents=True, exist_ok=True)
    if merged:
        return write_folder(to, lambda partial: _write_merged(partial, model, tokenizer, card))
    return write_adapter(model, to, lambda partial: _write_adapter_files(partial, adapter, config, tokenizer, card))


def load_run_model(adapter: Path, config: ExperimentConfig) -> PeftModel:
    """The run's model: its carried base (else the base its adapter names), the adapter on it."""
    auto = AutoModelForCausalLM if config.model.causal else AutoModelForSequenceClassification
    source = str(adapter / BASE_DIR) if _carried(adapter) else PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    try:
        with quiet_transformers():  # an older run's base lacks the head, which the adapter restores
            return PeftModel.from_pretrained(auto.from_pretrained(source), str(adapter))
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{adapter}: cannot load its base {source!r}: {first}") from None


def _checked_adapter(run_dir: Path) -> Path:
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no {CONFIG}); give a folder that fedlora simulate wrote")
    adapter = run_dir / ADAPTER
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise ConfigError(
            f"{run_dir}: the run has no adapter ({adapter / ADAPTER_CONFIG} is missing); a run writes it when it finishes: "
            f"fedlora simulate --resume {run_dir}"
        )
    return adapter


def _check_destination(to: Path, run_dir: Path, overwrite: bool) -> None:
    target, run = to.resolve(), run_dir.resolve()
    if run.is_relative_to(target) or target.is_relative_to(run / ADAPTER):
        raise ConfigError(f"--to {to}: it holds the run or is inside its adapter; give a folder outside them")
    if not target.name or Path.cwd().resolve().is_relative_to(target):
        raise ConfigError(f"--to {to}: it holds the current folder; give a new folder for the export")
    if to.exists() and not to.is_dir():
        raise ConfigError(f"--to {to}: a file is there; give a folder")
    if to.is_dir() and any(to.iterdir()):
        if not overwrite:
            raise ConfigError(f"--to {to}: the folder is not empty; give another one, or add --overwrite to replace it")
        if not _is_export(to):  # --overwrite replaces an earlier export, never an arbitrary folder
            raise ConfigError(f"--to {to}: the folder holds something other than an export; --overwrite replaces only exports")


def _is_export(folder: Path) -> bool:
    """Whether `folder` looks like what `export_run` writes: a card beside an adapter or a model config."""
    return (folder / CARD).is_file() and ((folder / ADAPTER_CONFIG).is_file() or (folder / MODEL_CONFIG).is_file())


def _carried(adapter: Path) -> bool:
    return (adapter / BASE_DIR / MODEL_CONFIG).is_file()


def _write_adapter_files(
    partial: Path, adapter: Path, config: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, card: str
) -> None:
    """Beside peft's save: the task, the base (linked in, or named as the run's adapter names it), tokenizer, card."""
    kind = task_kind(config.model)
    (partial / CARD).write_text(card)
    if not _carried(adapter):
        declare_task(partial, kind, PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path)
        tokenizer.save_pretrained(str(partial))
        return
    declare_task(partial, kind, BASE_REFERENCE)
    base = partial / BASE_DIR
    base.mkdir()
    shutil.copyfile(adapter / BASE_DIR / MODEL_CONFIG, base / MODEL_CONFIG)
    files = weight_files(adapter / BASE_DIR)
    present = {name for file in files for name in tensor_names(file)}
    missing_head = {name: tensor for name, tensor in adapter_head(partial).items() if name not in present}
    # Copies, not links: an export is the user's to change, and a link shares its bytes with the run
    # and the model cache, which an in-place write would change too.
    link_weights(base, files, missing_head, copy=True)
    carry_base(partial, tokenizer)


def _write_merged(partial: Path, model: PeftModel, tokenizer: PreTrainedTokenizerBase, card: str) -> None:
    model.merge_and_unload().save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    (partial / CARD).write_text(card)


def _card(adapter: Path, config: ExperimentConfig, merged: bool, carries_base: bool) -> str:
    """The run's card with its loading section for what the export holds (a run's card without one keeps it whole)."""
    path = adapter / CARD
    written = path.read_text() if path.is_file() else ""
    summary = written.split(LOADING)[0].rstrip("\n")
    if merged:
        summary = summary.replace("library_name: peft", "library_name: transformers", 1).replace(
            ": a LoRA adapter trained", ": a model fine-tuned with LoRA (merged into its weights) trained", 1
        )
    return summary + "\n\n" + loading_section(config, merged, carries_base)
