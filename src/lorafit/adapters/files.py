"""Adapter files lorafit loads (eval, merge, serve): PEFT directories of safetensors, checked before use.

A bad directory is a clear error that names it: no adapter_config.json, pickle weights (loading them
can run code), a corrupted or truncated safetensors file, or an adapter made for another model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lorafit.base.errors import UserError


def check_adapter_files(path: Path) -> None:
    """A PEFT adapter directory lorafit will load: config present, weights as readable safetensors
    (pickle `.bin` refused: loading it can run code)."""
    from safetensors import SafetensorError, safe_open

    if not (path / "adapter_config.json").is_file():
        raise UserError("not a PEFT adapter directory (no adapter_config.json)", file=str(path))
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = (path / "adapter_model.bin").is_file()
        why = "pickle adapters (adapter_model.bin) are refused; save it as safetensors" if pickled else "no weights"
        raise UserError(f"{why} (adapter_model.safetensors)", file=str(path))
    try:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise UserError(f"corrupted or truncated safetensors file: {e}", file=str(weights)) from e


def load_adapter(model: Any, path: Path, name: str | None = None) -> Any:
    """Put the adapter at `path` on `model` (a base model, or a PeftModel for a further named adapter);
    an adapter made for another model is a clear error, not a wall of size mismatches."""
    from peft import PeftModel

    check_adapter_files(path)
    try:
        if name is None:
            return PeftModel.from_pretrained(model, str(path), is_trainable=False)
        model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        return model
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        text = str(e)
        shape = r"torch\.Size\((\[[^\]]*\])\)"
        mismatches = re.findall(
            rf"size mismatch for (\S+): copying a param with shape {shape} from checkpoint, "
            rf"the shape in current model is {shape}",
            text,
        )
        if mismatches:
            where, theirs, ours = mismatches[0]
            raise UserError(
                f"adapter does not fit this base model: {len(mismatches)} tensors differ in shape, e.g. {where} is "
                f"{theirs} in the adapter and {ours} here; was it trained on another model?",
                file=str(path),
            ) from e
        raise UserError(
            f"cannot load adapter: {text.splitlines()[0] if text else type(e).__name__}", file=str(path)
        ) from e
