"""Checkpoints and exports shared by the modules that train LoRA adapters (SFT and RL).

Checkpoints hold only the trainable weights (the frozen base is rebuilt from ``backbone``). At the end of
a fit that was not interrupted, ``<default_root_dir>/model/adapter`` (the LoRA adapter) and, with
``save_merged``, ``<default_root_dir>/model/merged`` (base + adapter merged, with the tokenizer: what the
next stage and evaluation load as ``backbone.name``) are written under a temporary name and swapped in.
"""

from __future__ import annotations

import copy
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


class AdapterCheckpointing:
    """Mixin for a LightningModule with ``self.llm`` (a peft model), ``self.tokenizer`` and the hparam
    ``save_merged``."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {_clean(name) for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if _clean(k) in trainable}

    def on_fit_end(self) -> None:
        if self.trainer.interrupted:
            return
        root = Path(self.trainer.default_root_dir) / "model"
        if _sharded(self.trainer):  # FSDP: every rank takes part in gathering the adapter onto rank 0
            state = self.trainer.strategy.lightning_module_state_dict()
            if self.trainer.is_global_zero:
                root.mkdir(parents=True, exist_ok=True)
                save_folder(root / "adapter", lambda folder: _save_adapter(self.llm, state, folder))
            return
        if not self.trainer.is_global_zero:
            return
        root.mkdir(parents=True, exist_ok=True)
        save_folder(root / "adapter", lambda folder: self.llm.save_pretrained(folder))
        if self.hparams.save_merged:

            def merged(folder: Path) -> None:
                model = copy.deepcopy(self.llm).merge_and_unload()
                model.save_pretrained(folder, safe_serialization=True)
                self.tokenizer.save_pretrained(folder)

            save_folder(root / "merged", merged)


def save_folder(final: Path, write: Callable[[Path], None]) -> None:
    """Write a folder under a temporary name, then swap it in (an interrupted write leaves the old one)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sharded(trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def _save_adapter(llm, state: dict[str, Any], folder: Path) -> None:
    """A peft adapter folder from a gathered (FSDP) state dict: the LoRA weights under peft's names."""
    from safetensors.torch import save_file

    prefix = "llm.base_model.model."
    weights = {
        "base_model.model." + re.sub(r"\.default(?=\.|$)", "", _clean(k)[len(prefix):]): v.detach().cpu().contiguous()
        for k, v in state.items()
        if _clean(k).startswith(prefix) and "lora_" in k
    }
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    llm.peft_config["default"].save_pretrained(str(folder))


def _clean(name: str) -> str:
    """A parameter name without the wrappers FSDP and activation checkpointing insert (as in a full state dict)."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
