"""``Sequential``: run layers one after another (MegEngine's ``M.Sequential``)."""

from __future__ import annotations

from collections import OrderedDict

from .module import Module

__all__ = ["Sequential"]


class Sequential(Module):
    """A chain of modules, called in order.

    Layers given positionally become the attributes (and children) ``"0"``,
    ``"1"``, ...; an ``OrderedDict`` names them itself. State-dict keys are
    therefore ``"0.weight"``, ``"1.bias"``, ..., as in MegEngine. Like every
    module, children are visited in *sorted* name order, so with 11 or more
    layers the state dict lists ``"10.*"`` before ``"2.*"`` (MegEngine does the
    same); the forward pass and the repr use the layer order.

    Parameters
    ----------
    *args : Module, or one OrderedDict of name -> Module
    name : str, optional
        The module's name (keyword only).

    Examples
    --------
    >>> import numpy as np, volconv.module as M
    >>> net = M.Sequential(M.Conv3d(1, 2, 3), M.ReLU())
    >>> print(net)
    Sequential(
      (0): Conv3d(1, 2, kernel_size=(3, 3, 3))
      (1): ReLU()
    )
    >>> list(net.state_dict())
    ['0.bias', '0.weight']
    >>> net(np.zeros((1, 1, 4, 4, 4), dtype=np.float32)).shape
    (1, 2, 2, 2, 2)
    """

    def __init__(self, *args, name: str | None = None) -> None:
        super().__init__(name=name)
        self.layer_keys: list[str] = []
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            items = [(str(key), module) for key, module in args[0].items()]
        else:
            items = [(str(index), module) for index, module in enumerate(args)]
        for key, module in items:
            if not isinstance(module, Module):
                raise TypeError(
                    f"Sequential takes Modules, got {type(module).__name__} for layer {key!r}"
                )
            setattr(self, key, module)
            self.layer_keys.append(key)

    @property
    def layer_values(self) -> list[Module]:
        """The layers, in order."""
        return [getattr(self, key) for key in self.layer_keys]

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            keys = self.layer_keys[idx]
            return type(self)(OrderedDict((key, getattr(self, key)) for key in keys))
        return getattr(self, self.layer_keys[idx])

    def __setitem__(self, idx: int, module: Module) -> None:
        setattr(self, self.layer_keys[idx], module)

    def __delitem__(self, idx) -> None:
        keys = self.layer_keys[idx] if isinstance(idx, slice) else [self.layer_keys[idx]]
        for key in keys:
            delattr(self, key)
            self.layer_keys.remove(key)

    def __len__(self) -> int:
        return len(self.layer_keys)

    def __iter__(self):
        return iter(self.layer_values)

    def forward(self, inp):
        """Feed ``inp`` through every layer in order."""
        for layer in self.layer_values:
            inp = layer(inp)
        return inp
