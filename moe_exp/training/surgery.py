"""Expert surgery: start from a trained mixture's checkpoint and operate on single experts.

A mixture is meant to be modular: an expert can be replaced, updated or added without
rebuilding the system. This module makes each of those an override of a run (``surgery.*``,
conf/surgery/none.yaml), applied to a :class:`~moe_exp.models.MixtureClassifier` right after
it is built (:func:`moe_exp.app.build.build_components`), in the order :class:`Surgery`
gives: ``init_from``, ``replace``, ``remove``, ``add``, ``graft``, then ``train``. Every
checkpoint stores each expert's tensors under its own prefix, so :func:`expert_state` /
:func:`load_expert` move one expert between mixtures.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers
only, never pickled code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_exp.errors import ConfigError, MoeExpError
from moe_exp.moe import MoE
from moe_exp.moe.experts import build_experts, first_kind
from moe_exp.training import checkpoints

log = logging.getLogger("moe_exp")
TRAIN_WORDS = ("all", "gate", "experts", "new")
EXPERT_PREFIX = "model.moe.experts."


# -- checkpoints --------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """A ``.ckpt`` file as given, or a run folder's ``checkpoints/best.ckpt``."""
    path = Path(path).expanduser()
    candidate = path / "checkpoints" / "best.ckpt" if path.is_dir() else path
    if not candidate.is_file():
        raise ConfigError(
            f"checkpoint {candidate} not found: give a run folder (with checkpoints/best.ckpt) "
            "or a .ckpt file"
        )
    return candidate


def load_run_checkpoint(path: str | Path) -> dict[str, Any]:
    """A run folder's best checkpoint or a ``.ckpt`` (tensors and plain containers only)."""
    return checkpoints.load_checkpoint(resolve_checkpoint(path))


def checkpoint_experts(checkpoint: Mapping[str, Any]) -> int:
    """How many mixture experts a checkpoint holds (0 for other models)."""
    ids = {
        int(key[len(EXPERT_PREFIX) :].split(".", 1)[0])
        for key in checkpoint["state_dict"]
        if key.startswith(EXPERT_PREFIX)
    }
    return len(ids)


def expert_state(checkpoint: Mapping[str, Any] | str | Path, index: int) -> dict[str, Tensor]:
    """Expert ``index``'s own state_dict (parameters and buffers) from a checkpoint (or its
    path), ready for ``expert.load_state_dict``."""
    if not isinstance(checkpoint, Mapping):
        checkpoint = load_run_checkpoint(checkpoint)
    prefix = f"{EXPERT_PREFIX}{index}."
    tensors = checkpoint["state_dict"]
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not state:
        raise ConfigError(
            f"the checkpoint has no expert {index} (it holds "
            f"{checkpoint_experts(checkpoint)} mixture experts)"
        )
    return state


def load_expert(model: nn.Module, index: int, state: Mapping[str, Tensor]) -> None:
    """Load one expert's state (from :func:`expert_state`) into expert ``index`` of a
    mixture; it must be of the same kind and size."""
    experts = _experts(model)
    if not 0 <= index < len(experts):
        raise ConfigError(f"expert {index} is out of range: the mixture has {len(experts)}")
    try:
        experts[index].load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(
            f"the expert does not fit expert {index} ({type(experts[index]).__name__}) of "
            f"this mixture: {err}"
        ) from err


def _experts(model: nn.Module) -> nn.ModuleList:
    experts = getattr(getattr(model, "moe", None), "experts", None)
    if not isinstance(experts, nn.ModuleList) or not hasattr(model, "gate_encoder"):
        raise ConfigError(
            f"expert surgery needs model=mixture (whole-classifier experts behind one gate); "
            f"{type(model).__name__} does not support it"
        )
    return experts


# -- the router ---------------------------------------------------------------------------
@torch.no_grad()
def resize_router(old: nn.Module, new: nn.Module, keep: Sequence[int | None]) -> None:
    """Copy a trained router into one with another expert count: new expert j takes old
    expert ``keep[j]``'s slice of every tensor (None: stays freshly initialised); tensors
    without an expert axis are copied whole."""
    e_old, e_new = old.num_experts, new.num_experts
    pairs = [(j, i) for j, i in enumerate(keep) if i is not None]
    dst = torch.tensor([j for j, _ in pairs], dtype=torch.long)
    src = torch.tensor([i for _, i in pairs], dtype=torch.long)
    old_state = old.state_dict()
    for key, target in new.state_dict().items():
        value = old_state[key]
        axes = [
            d
            for d in range(value.dim())
            if value.shape[d] == e_old
            and target.shape[d] == e_new
            and value.shape[:d] + value.shape[d + 1 :] == target.shape[:d] + target.shape[d + 1 :]
        ]
        if len(axes) == 1:
            target.index_copy_(axes[0], dst, value.index_select(axes[0], src).to(target.dtype))
        elif value.shape == target.shape and e_old not in value.shape:
            target.copy_(value)
        else:
            raise ConfigError(
                f"cannot resize router {type(old).__name__}: its {key} {tuple(value.shape)} has "
                f"no single expert axis (experts {e_old} → {e_new})"
            )


# -- the operation ------------------------------------------------------------------------
@dataclass
class Surgery:
    """The ``surgery`` config block; its operations apply in this order:

    1. ``init_from``: load a run folder's ``checkpoints/best.ckpt`` (or a ``.ckpt`` file).
       The config must build the source's architecture (its ``experts``, ``expert``,
       ``gate``, ``model``); a mismatch fails with the checkpoint's expert count and the bad
       keys.
    2. ``replace``: expert ids (source numbering) re-initialised fresh, of the kind named by
       ``expert`` (an option of conf/expert, e.g. ``mlp``) or, when null, of the kind they
       were. Their router rows are kept: the fresh expert inherits its slot's inputs.
    3. ``remove``: expert ids (source numbering) dropped with their router rows; the others
       keep their order and are renumbered 0..E'−1.
    4. ``add``: fresh experts appended (ids E', E'+1, ...); the router gains as many outputs,
       new rows freshly initialised, the existing rows kept. Any router whose tensors have
       one axis of length E is resized this way (linear, noisy top-k, hash, cosine,
       bias-balanced, ...); others fail with a message.
    5. ``graft``: experts copied from other checkpoints, ``[{from: <run or .ckpt>, expert: i,
       into: j}]`` (j in the final numbering). Each checkpoint indexes its experts' tensors
       (prefix ``model.moe.experts.{i}.``) in its ``experts`` entry.
    6. ``train``: what trains, the rest frozen for the whole run: ``all`` (default), ``gate``
       (gating network + router), ``experts``, ``new`` (replaced, added and grafted experts),
       or an expert id (final numbering). Frozen parameters get ``requires_grad=False`` (so
       no optimiser holds them) and frozen modules stay in eval mode (no dropout, no
       BatchNorm statistics drift): they are bit-identical after training.
    """

    init_from: str | None = None
    replace: list[int] = field(default_factory=list)
    remove: list[int] = field(default_factory=list)
    add: int = 0
    graft: list[dict[str, Any]] = field(default_factory=list)
    expert: str | None = None
    train: list[Any] = field(default_factory=lambda: ["all"])
    old_experts: dict[int, dict[str, Tensor]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.replace, self.remove = [int(i) for i in self.replace], [int(i) for i in self.remove]
        self.train = [int(t) if _is_int(t) else str(t) for t in (self.train or ["all"])]
        bad = [t for t in self.train if isinstance(t, str) and t not in TRAIN_WORDS]
        if bad:
            raise ConfigError(
                f"surgery.train={self.train}: {bad} not understood; use {', '.join(TRAIN_WORDS)} "
                "or expert ids"
            )
        for entry in self.graft:
            if set(entry) != {"from", "expert", "into"}:
                raise ConfigError(
                    f"surgery.graft entry {dict(entry)} needs exactly the keys from, expert, into"
                )
        if self.edits and not self.init_from:
            raise ConfigError(
                "surgery.replace/remove/add/graft operate on a trained mixture: set "
                "surgery.init_from to its run folder or .ckpt"
            )

    @property
    def edits(self) -> bool:
        """Whether the mixture's experts change (replaced, removed, added or grafted)."""
        return bool(self.replace or self.remove or self.add or self.graft)

    @property
    def active(self) -> bool:
        return bool(self.init_from or self.graft or self.train != ["all"])

    def apply(
        self,
        model: nn.Module,
        expert: Callable[..., Any],
        router: Callable[..., nn.Module],
        in_shape: Sequence[int],
        num_classes: int,
        new_expert: Callable[..., Any] | None = None,
    ) -> list[nn.Module]:
        """Operate on ``model`` in place; returns the modules to keep frozen.

        ``expert``/``router`` are the config's partials (the kinds the model was built
        with); ``new_expert`` the kind for replaced and added experts (default: as built).
        """
        in_shape = tuple(in_shape)
        if self.init_from:
            self._load(model, self.init_from)
        if not self.edits and "all" in self.train:
            return []  # a warm start: any model
        experts = _experts(model)
        e0 = len(experts)
        for i in (*self.replace, *self.remove):
            if not 0 <= i < e0:
                raise ConfigError(f"surgery: expert {i} is out of range (the mixture has {e0})")

        def fresh(i: int | None) -> nn.Module:
            if new_expert is not None:
                return first_kind(new_expert)(in_shape=in_shape, num_outputs=num_classes)
            if i is None:
                return first_kind(expert)(in_shape=in_shape, num_outputs=num_classes)
            return build_experts(expert, e0, in_shape, num_classes)[i]  # expert i's own kind

        modules = list(experts)
        for i in self.replace:
            modules[i] = fresh(i)
        keep: list[int | None] = [i for i in range(e0) if i not in self.remove]
        modules = [modules[i] for i in keep]
        added = [fresh(None) for _ in range(self.add)]
        keep += [None] * self.add
        new_ids = {keep.index(i) for i in self.replace if i in keep}
        new_ids |= set(range(len(modules), len(modules) + self.add))
        modules += added
        if not modules:
            raise ConfigError("surgery removes every expert")
        if len(modules) != e0 or keep != list(range(e0)):
            self._rebuild(model, modules, router, keep)
        else:
            model.moe.experts = nn.ModuleList(modules)
        for entry in self.graft:
            j = int(entry["into"])
            load_expert(model, j, expert_state(entry["from"], int(entry["expert"])))
            new_ids.add(j)
        # the source's experts as loaded, by final id: what a frozen expert must still be
        # after training (and what fine-tuning everything moves away from)
        self.old_experts = {
            j: {k: v.detach().clone() for k, v in model.moe.experts[j].state_dict().items()}
            for j, i in enumerate(keep)
            if i is not None and j not in new_ids
        }
        frozen = self._frozen(model, new_ids)
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        if getattr(model, "channels_last", False):
            model.to(memory_format=torch.channels_last)
        log.info(
            "surgery: %d → %d experts (replaced %s, removed %s, added %d, grafted into %s); "
            "training %s",
            e0,
            len(modules),
            self.replace,
            self.remove,
            self.add,
            [int(g["into"]) for g in self.graft],
            self.train,
        )
        return frozen

    def _load(self, model: nn.Module, source: str) -> None:
        path = resolve_checkpoint(source)
        checkpoint = checkpoints.load_checkpoint(path)
        state = {k[6:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        try:
            checkpoints.check_fits(state, model.state_dict(), path)
        except MoeExpError as err:
            raise ConfigError(
                f"surgery.init_from={source}: the checkpoint ({checkpoint_experts(checkpoint)} "
                "mixture experts) does not fit the model this config builds; give the source "
                f"run's experts, expert, gate and model overrides. {err}"
            ) from None
        model.load_state_dict(state)

    @staticmethod
    def _rebuild(
        model: nn.Module,
        experts: list[nn.Module],
        router: Callable[..., nn.Module],
        keep: list[int | None],
    ) -> None:
        old = model.moe
        try:
            new_router = router(in_features=model.gate_encoder.out_features, num_experts=len(keep))
        except ValueError as err:
            raise ConfigError(f"surgery: the gate cannot route {len(keep)} experts: {err}") from err
        resize_router(old.router, new_router, keep)
        model.moe = MoE(
            new_router,
            experts,
            dict(old.regularizers),
            transform=old.transform,
            record_predictions=old.record_predictions,
        )

    def _frozen(self, model: nn.Module, new_ids: set[int]) -> list[nn.Module]:
        """Every gate part and expert that ``train`` does not name."""
        if "all" in self.train:
            return []
        experts = list(model.moe.experts)
        trained: set[int] = set()
        for item in self.train:
            if item == "experts":
                trained |= set(range(len(experts)))
            elif item == "new":
                trained |= new_ids
            elif isinstance(item, int):
                if not 0 <= item < len(experts):
                    raise ConfigError(
                        f"surgery.train names expert {item}; the mixture has {len(experts)} "
                        "after surgery (ids 0.." + str(len(experts) - 1) + ")"
                    )
                trained.add(item)
        frozen = [e for i, e in enumerate(experts) if i not in trained]
        frozen += [] if "experts" in self.train else list(getattr(model, "shared", []))
        if "gate" not in self.train:
            frozen += [model.gate_encoder, model.moe.router]
        return frozen


def unchanged_experts(model: nn.Module, old: Mapping[int, Mapping[str, Tensor]]) -> dict[str, int]:
    """How many of the source's kept experts are still bit-identical to what was loaded
    (every parameter and buffer ``torch.equal``): the claim that adding an expert leaves the
    others untouched, measured on the model as tested. Empty without surgery edits."""
    if not old:
        return {}
    experts = _experts(model)
    same = sum(
        all(torch.equal(v, state[k]) for k, v in experts[j].state_dict().items())
        for j, state in old.items()
    )
    return {"surgery/old_experts": len(old), "surgery/old_experts_unchanged": same}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())
