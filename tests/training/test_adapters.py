"""Plain strategies and datamodules reach Lightning through adapters, so checking a config
imports no Lightning."""

import subprocess
import sys

import lightning as L

from moe_exp.data.shapes import ShapesDataModule
from moe_exp.training.adapters import StrategyHooks, lightning_data


def test_the_data_adapter_forwards_hooks_and_attributes_both_ways():
    data = ShapesDataModule(n_train=64, n_val=16, n_test=16, batch_size=8)
    module = lightning_data(data)
    assert isinstance(module, L.LightningDataModule) and lightning_data(module) is module
    module.setup("fit")
    assert module.splits is data.splits and module.num_classes == data.num_classes
    module.batch_size = 4  # a write reaches the data, as it would on the data itself
    assert data.batch_size == 4 and len(next(iter(module.train_dataloader()))[0]) == 4
    assert module.trainer is None and "trainer" not in vars(data)  # Lightning's own stay apart


class Counting:
    """A strategy that is no Lightning class: hooks and a checkpoint state."""

    def __init__(self):
        self.epochs, self.state = [], None

    def on_train_epoch_start(self, trainer, module):
        self.epochs.append(trainer)

    def state_dict(self):
        return {"seen": len(self.epochs)}

    def load_state_dict(self, state):
        self.state = state


def test_the_strategy_adapter_forwards_hooks_and_keys_state_by_the_strategy():
    strategy = Counting()
    hooks = StrategyHooks(strategy)
    hooks.on_train_epoch_start("t", None)
    hooks.on_train_epoch_end("t", None)  # not defined by the strategy: nothing happens
    assert strategy.epochs == ["t"] and hooks.state_key == "Counting"  # as a Callback's
    assert hooks.state_dict() == {"seen": 1}
    hooks.load_state_dict({"seen": 3})
    assert strategy.state == {"seen": 3}


def test_checking_a_config_imports_no_lightning():
    code = (
        "import sys\n"
        "from moe_exp.app.compose import compose\n"
        "from moe_exp.app.config import validate\n"
        "for over in ([], ['strategy=em'], ['strategy=hierarchical', 'data=digits']):\n"
        "    validate(compose(over), over)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
