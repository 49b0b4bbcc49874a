"""What Lightning is handed for a strategy or a datamodule that are plain classes.

The strategies and the datamodules of the ``strategy`` and ``data`` axes do not subclass
Lightning's classes, so composing and checking a config (which imports every component's
class for its rules) needs no Lightning import. Lightning gets them through these adapters:
a Callback that forwards its hooks and checkpoint state to the strategy, and a
LightningDataModule that forwards the datamodule hooks and every attribute to the data.
A component that already is a Lightning class (a user's own datamodule) is used as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L


class StrategyHooks(L.Callback):
    """A Lightning Callback running a strategy's hooks (any ``on_*``, ``setup``,
    ``teardown`` it defines), with its checkpoint state under the strategy's class name."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    @property
    def state_key(self) -> str:
        return type(self.strategy).__qualname__

    def state_dict(self) -> dict[str, Any]:
        saver = getattr(self.strategy, "state_dict", None)
        return saver() if callable(saver) else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        loader = getattr(self.strategy, "load_state_dict", None)
        if callable(loader):
            loader(state_dict)


def _forward_hook(name: str) -> Callable[..., Any]:
    def hook(self: StrategyHooks, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.strategy, name, None)
        return method(*args, **kwargs) if callable(method) else None

    hook.__name__ = name
    return hook


for _name in [n for n in vars(L.Callback) if n.startswith("on_") or n in ("setup", "teardown")]:
    setattr(StrategyHooks, _name, _forward_hook(_name))


class LightningData(L.LightningDataModule):
    """A LightningDataModule around a plain datamodule: Lightning's hooks call the data's,
    and any other attribute is the data's (read and written)."""

    def __init__(self, data: Any) -> None:
        super().__init__()
        self.data = data  # last: the attributes Lightning set above stay the adapter's

    def __getattr__(self, name: str) -> Any:
        if name == "data":  # not set yet (inside __init__)
            raise AttributeError(name)
        return getattr(self.data, name)

    def __setattr__(self, name: str, value: Any) -> None:
        mine = name in self.__dict__ or hasattr(type(self), name)
        if "data" in self.__dict__ and not mine:
            setattr(self.data, name, value)
        else:
            object.__setattr__(self, name, value)

    def _call(self, name: str, *args: Any) -> Any:
        method = getattr(self.data, name, None)
        return method(*args) if callable(method) else None

    def prepare_data(self) -> None:
        self._call("prepare_data")

    def setup(self, stage: str | None = None) -> None:
        self._call("setup", stage)

    def teardown(self, stage: str | None = None) -> None:
        self._call("teardown", stage)

    def train_dataloader(self) -> Any:
        return self.data.train_dataloader()

    def val_dataloader(self) -> Any:
        return self.data.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.data.test_dataloader()

    def state_dict(self) -> dict[str, Any]:
        return self._call("state_dict") or {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._call("load_state_dict", state_dict)


def lightning_data(data: Any) -> L.LightningDataModule:
    """The datamodule as Lightning takes it (unchanged if it already is one)."""
    return data if isinstance(data, L.LightningDataModule) else LightningData(data)
