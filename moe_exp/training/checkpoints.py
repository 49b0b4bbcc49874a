"""Reading checkpoints safely: ``torch.load(weights_only=True)`` (tensors and plain
containers, never pickled code) and a shape check that names every mismatched key, for
resuming a run and for expert surgery alike."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from moe_exp.errors import MoeExpError

SHOWN_MISMATCHES = 5


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code.
    Unreadable files raise a MoeExpError saying what the file is not."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MoeExpError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):  # torch's format is a zip archive
            raise MoeExpError(
                f"checkpoint {path} could not be read: it is corrupted, truncated or not a "
                "PyTorch checkpoint (not a torch.save archive)"
            ) from None
        reason = [ln.strip() for ln in str(err).splitlines() if "WeightsUnpickler error" in ln]
        raise MoeExpError(
            f"checkpoint {path} was refused by torch.load(weights_only=True): it holds objects "
            f"other than tensors and plain containers ({(reason or ['unsafe content'])[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoeExpError(
            f"checkpoint {path} could not be read: it is corrupted, truncated or not a "
            f"PyTorch checkpoint ({type(err).__name__}: {first})"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise MoeExpError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def _shape(t: Any) -> str:
    return str(list(t.shape)) if hasattr(t, "shape") else type(t).__name__


def check_fits(saved: Mapping[str, Any], expected: Mapping[str, Any], path: Path) -> None:
    """Raise a MoeExpError naming every key whose shape differs (checkpoint vs model) and
    the keys only one side has, as another architecture or expert count gives."""
    problems = [
        f"{key}: checkpoint shape {_shape(saved[key])}, model shape {_shape(expected[key])}"
        for key in expected
        if key in saved and _shape(saved[key]) != _shape(expected[key])
    ]
    problems += [f"{k}: in the model, not in the checkpoint" for k in expected if k not in saved]
    problems += [f"{k}: in the checkpoint, not in the model" for k in saved if k not in expected]
    if problems:
        more = len(problems) - SHOWN_MISMATCHES
        shown = "; ".join(problems[:SHOWN_MISMATCHES]) + (f"; and {more} more" if more > 0 else "")
        raise MoeExpError(
            f"checkpoint {path} does not fit this model (another architecture, expert count "
            f"or config?): {shown}. Resume with the run's own config, or start a new run."
        )
