"""``Module``: the base class of every layer, with MegEngine 1.13's semantics.

A module finds its parameters, buffers and children by scanning its own
attributes (``vars(self)``) in **sorted** attribute-name order, looking through
lists, tuples and dicts as MegEngine does. There is no separate registry, so
``self.conv1 = Conv3d(...)`` or ``self.w = Parameter(...)`` is all it takes.
Keys are dotted paths (``"conv1.weight"``, ``"layers.0.bias"``).

Differences from MegEngine (all deliberate):

- ``load_state_dict`` checks every key, type and shape before it changes
  anything, so a failed load leaves the module untouched (MegEngine half-loads).
- A value that is not a numpy array raises ``TypeError`` (MegEngine: a bare
  ``AssertionError``) with MegEngine's message text.
- Arrays are converted to each parameter's own dtype (MegEngine adopts the
  array's dtype for float16/int32 and crashes on float64).
"""

from __future__ import annotations

import logging
import warnings
from abc import ABCMeta, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..tensor import Parameter, Tensor

__all__ = ["HookHandler", "Module"]

logger = logging.getLogger(__name__)

# ---- helpers ------------------------------------------------------------------------------------
_HOOK_ATTRS = frozenset({"_forward_pre_hooks", "_forward_hooks"})  # never hold children


def _is_module(obj) -> bool:
    return isinstance(obj, Module)


def _is_parameter(obj) -> bool:
    return isinstance(obj, Parameter)


def _is_buffer(obj) -> bool:
    return isinstance(obj, Tensor) and not isinstance(obj, Parameter)


def _is_state(obj) -> bool:
    return isinstance(obj, Tensor)


def _expand(key: str, obj) -> list[tuple[str, Any]]:
    """``(dotted key, leaf)`` for every Tensor/Module inside ``obj`` (lists, tuples, dicts).

    Dict keys are visited in sorted order and list items by index, as in MegEngine.
    """
    if isinstance(obj, (Tensor, Module)):
        return [(key, obj)]
    if not isinstance(obj, (list, tuple, dict)):
        return []
    if isinstance(obj, dict):
        items = [(k, obj[k]) for k in sorted(obj, key=str)]
    else:
        items = [(str(i), v) for i, v in enumerate(obj)]
    found = []
    for k, v in items:
        inner = _expand(k if isinstance(k, str) else str(k), v)
        if inner and not isinstance(k, str):
            raise TypeError(
                f"dict keys that lead to a Tensor or Module must be str, got {k!r} in {key!r}"
            )
        found.extend((f"{key}.{sub}", leaf) for sub, leaf in inner)
    return found


def _set_repr(keys) -> str:
    """``{'a', 'b'}`` with a stable (sorted) order, for error messages."""
    return "{" + ", ".join(repr(k) for k in sorted(keys, key=str)) + "}"


def _indent(text: str, spaces: int) -> str:
    first, *rest = text.split("\n")
    return "\n".join([first] + [" " * spaces + line for line in rest])


class HookHandler:
    """Returned by ``register_forward_(pre_)hook``; ``remove()`` unregisters the hook.

    >>> import volconv.module as M
    >>> m = M.ReLU()
    >>> handle = m.register_forward_hook(lambda mod, inputs, out: out * 2)
    >>> handle.remove()
    """

    _next_id = 0

    def __init__(self, hooks: OrderedDict, hook: Callable) -> None:
        self._hooks = hooks
        self.id = HookHandler._next_id
        HookHandler._next_id += 1
        hooks[self.id] = hook

    def remove(self) -> None:
        self._hooks.pop(self.id, None)


# ---- Module -------------------------------------------------------------------------------------
class Module(metaclass=ABCMeta):
    """Base class of all layers (MegEngine's ``megengine.module.Module``).

    Subclasses call ``super().__init__()`` and implement :meth:`forward`. Any
    :class:`~volconv.Parameter`, buffer (plain :class:`~volconv.Tensor`) or
    ``Module`` assigned as an attribute, directly or inside a list, tuple or dict,
    becomes part of the module.

    Parameters
    ----------
    name : str, optional
        A non-empty name for the module (kept as ``self.name``).

    Examples
    --------
    >>> import numpy as np
    >>> import volconv as mge, volconv.module as M, volconv.functional as F
    >>> class Net(M.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv1 = M.Conv3d(1, 2, 3)
    ...         self.conv2 = M.ConvTranspose3d(2, 1, 3, bias=False)
    ...     def forward(self, x):
    ...         return self.conv2(F.relu(self.conv1(x)))
    >>> net = Net()
    >>> print(net)
    Net(
      (conv1): Conv3d(1, 2, kernel_size=(3, 3, 3))
      (conv2): ConvTranspose3d(2, 1, kernel_size=(3, 3, 3), bias=False)
    )
    >>> list(net.state_dict())
    ['conv1.bias', 'conv1.weight', 'conv2.weight']
    >>> net(np.zeros((1, 1, 5, 5, 5), dtype=np.float32)).shape
    (1, 1, 5, 5, 5)
    """

    def __init__(self, name: str | None = None) -> None:
        self._modules: list[str] = []
        if name is not None and not (isinstance(name, str) and name.strip()):
            raise ValueError(f"Module name must be a non-empty string, got {name!r}")
        self.name = name
        self.training = True
        self.quantize_disabled = False
        self._forward_pre_hooks: OrderedDict = OrderedDict()
        self._forward_hooks: OrderedDict = OrderedDict()
        self._name: str | None = None
        self._short_name: str | None = None

    @abstractmethod
    def forward(self, inputs):
        """Compute the output; called by ``module(...)``."""

    # ---- calling --------------------------------------------------------------------------------
    def register_forward_pre_hook(self, hook: Callable) -> HookHandler:
        """Call ``hook(module, inputs)`` before ``forward``; non-None replaces the inputs."""
        return HookHandler(self._forward_pre_hooks, hook)

    def register_forward_hook(self, hook: Callable) -> HookHandler:
        """Call ``hook(module, inputs, outputs)`` after ``forward``; non-None replaces outputs."""
        return HookHandler(self._forward_hooks, hook)

    def __call__(self, *inputs, **kwargs):
        for hook in self._forward_pre_hooks.values():
            changed = hook(self, inputs)
            if changed is not None:
                inputs = changed if isinstance(changed, tuple) else (changed,)
        outputs = self.forward(*inputs, **kwargs)
        for hook in self._forward_hooks.values():
            changed = hook(self, inputs, outputs)
            if changed is not None:
                outputs = changed
        return outputs

    # ---- attribute registration -----------------------------------------------------------------
    def __setattr__(self, name: str, value) -> None:
        # Like MegEngine, remember (in assignment order, for repr) every attribute that may
        # hold modules: modules themselves and lists/tuples/dicts.
        if name != "_modules":
            modules = self.__dict__.get("_modules")
            module_like = isinstance(value, (Module, list, tuple, dict))
            if module_like and modules is None:
                if _is_module(value):
                    raise AttributeError("cannot assign a module before Module.__init__() call")
            elif module_like:
                if name not in modules:
                    modules.append(name)
            elif modules is not None and name in modules:
                modules.remove(name)
            for key, leaf in _expand(name, value):
                if _is_module(leaf) and leaf.__dict__.get("_short_name") is None:
                    prefix = self.__dict__.get("_name") or self.__dict__.get("name")
                    leaf.__dict__["_short_name"] = key
                    leaf.__dict__["_name"] = f"{prefix}.{key}" if prefix else key
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        modules = self.__dict__.get("_modules")
        if modules is not None and name in modules:
            modules.remove(name)
        super().__delattr__(name)

    # ---- traversal ------------------------------------------------------------------------------
    def _flatten(
        self,
        *,
        recursive: bool = True,
        with_key: bool = False,
        prefix: str | None = None,
        predicate: Callable[[Any], bool] = lambda _: True,
        seen: set[int] | None = None,
    ) -> Iterator:
        """Tensors and modules reachable from the attributes, in sorted attribute order.

        Each object is yielded once (shared parameters are not repeated).
        """
        if seen is None:
            seen = {id(self)}
        dotted = "" if prefix is None else prefix + "."
        attributes = vars(self)
        for attr in sorted(attributes.keys() - _HOOK_ATTRS):
            for key, leaf in _expand(attr, attributes[attr]):
                if id(leaf) in seen:
                    continue
                seen.add(id(leaf))
                if predicate(leaf):
                    yield (dotted + key, leaf) if with_key else leaf
                if recursive and _is_module(leaf):
                    yield from leaf._flatten(
                        recursive=True,
                        with_key=with_key,
                        prefix=dotted + key if with_key else None,
                        predicate=predicate,
                        seen=seen,
                    )

    def parameters(self, recursive: bool = True) -> Iterator[Parameter]:
        """The :class:`~volconv.Parameter` objects, in ``named_parameters`` order.

        >>> import volconv.module as M
        >>> [p.shape for p in M.Conv3d(2, 4, 3).parameters()]
        [(1, 4, 1, 1, 1), (4, 2, 3, 3, 3)]
        """
        yield from self._flatten(predicate=_is_parameter, recursive=recursive)

    def named_parameters(
        self, prefix: str | None = None, recursive: bool = True
    ) -> Iterator[tuple[str, Parameter]]:
        """``(dotted name, Parameter)`` pairs, sorted by attribute name at every level.

        >>> import volconv.module as M
        >>> [name for name, _ in M.Conv3d(2, 4, 3).named_parameters(prefix="conv")]
        ['conv.bias', 'conv.weight']
        """
        yield from self._flatten(
            with_key=True, prefix=prefix, predicate=_is_parameter, recursive=recursive
        )

    def buffers(self, recursive: bool = True) -> Iterator[Tensor]:
        """Tensors that are not Parameters (none in the built-in layers)."""
        yield from self._flatten(predicate=_is_buffer, recursive=recursive)

    def named_buffers(
        self, prefix: str | None = None, recursive: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        """``(dotted name, buffer)`` pairs."""
        yield from self._flatten(
            with_key=True, prefix=prefix, predicate=_is_buffer, recursive=recursive
        )

    def children(self) -> Iterator[Module]:
        """The direct sub-modules, sorted by attribute name."""
        yield from self._flatten(predicate=_is_module, recursive=False)

    def named_children(self) -> Iterator[tuple[str, Module]]:
        """``(attribute name, sub-module)`` pairs for the direct sub-modules.

        >>> import volconv.module as M
        >>> [name for name, _ in M.Sequential(M.Conv3d(1, 2, 3), M.ReLU()).named_children()]
        ['0', '1']
        """
        yield from self._flatten(with_key=True, predicate=_is_module, recursive=False)

    def modules(self) -> Iterator[Module]:
        """This module and every module inside it."""
        yield self
        yield from self._flatten(predicate=_is_module)

    def named_modules(self, prefix: str | None = None) -> Iterator[tuple[str, Module]]:
        """``(dotted name, module)`` for this module (named ``prefix`` or ``""``) and all below."""
        yield ("" if prefix is None else prefix), self
        yield from self._flatten(with_key=True, prefix=prefix, predicate=_is_module)

    def apply(self, fn: Callable[[Module], Any]) -> None:
        """Call ``fn`` on every module in :meth:`modules`."""
        for module in self.modules():
            fn(module)

    # ---- modes and gradients --------------------------------------------------------------------
    def train(self, mode: bool = True, recursive: bool = True) -> None:
        """Set ``training`` to ``mode`` on this module (and, by default, all sub-modules).

        >>> import volconv.module as M
        >>> net = M.Sequential(M.Conv3d(1, 1, 1)); net.eval()
        >>> net.training, net[0].training
        (False, False)
        """
        if not recursive:
            self.training = mode
            return
        for module in self.modules():
            module.training = mode

    def eval(self) -> None:
        """``train(False)``."""
        self.train(False)

    def zero_grad(self) -> None:
        """Zero every existing ``.grad`` in place (deprecated, as in MegEngine).

        Prefer ``optimizer.clear_grad()``, which sets the gradients to ``None``.
        """
        warnings.warn(
            "Module.zero_grad is deprecated (as in MegEngine since 1.0); "
            "use optimizer.clear_grad() instead",
            DeprecationWarning,
            stacklevel=2,
        )
        for param in self.parameters():
            if param.grad is not None:
                param.grad.set_value(np.zeros_like(param.grad._data))

    # ---- state dict -----------------------------------------------------------------------------
    def _state_items(self, prefix: str = "") -> list[tuple[str, Tensor]]:
        """MegEngine's order: own tensors sorted, then each child (sorted) recursively."""
        items = [
            (prefix + key, tensor)
            for key, tensor in self._flatten(recursive=False, with_key=True, predicate=_is_state)
        ]
        for key, child in self._flatten(recursive=False, with_key=True, predicate=_is_module):
            items.extend(child._state_items(prefix + key + "."))
        return items

    def state_dict(
        self, rst: OrderedDict | None = None, prefix: str = "", keep_var: bool = False
    ) -> OrderedDict:
        """Every parameter and buffer by dotted name.

        Parameters
        ----------
        rst : OrderedDict, optional
            A dict to add the entries to (MegEngine's signature); a new one by default.
        prefix : str
            Prepended to every key.
        keep_var : bool
            Return the :class:`~volconv.Parameter` objects themselves instead of arrays.

        Returns
        -------
        collections.OrderedDict
            Keys sorted per level (own tensors first, then each child). Values are
            **read-only** numpy views of the current data (``flags.writeable`` is
            False), as in MegEngine. They share memory with the parameters until the
            next update (optimizers and loading replace a parameter's array), so
            take ``np.array(v)`` copies if a snapshot must survive in-place edits.

        Examples
        --------
        >>> import volconv.module as M
        >>> sd = M.Conv3d(2, 4, 3).state_dict()
        >>> [(k, v.shape) for k, v in sd.items()]
        [('bias', (1, 4, 1, 1, 1)), ('weight', (4, 2, 3, 3, 3))]
        >>> sd["bias"].flags.writeable
        False
        """
        result: OrderedDict = OrderedDict() if rst is None else rst
        for key, tensor in self._state_items(prefix):
            if key in result:
                raise ValueError(f"duplicated state: {key}")
            if keep_var:
                result[key] = tensor
            else:
                view = tensor._data.view()
                view.flags.writeable = False
                result[key] = view
        return result

    def load_state_dict(
        self,
        state_dict: dict | Callable[[str, Tensor], np.ndarray | None],
        strict: bool = True,
    ) -> None:
        """Copy arrays into this module's parameters and buffers, all or nothing.

        Parameters
        ----------
        state_dict : dict or callable
            A mapping ``name -> numpy.ndarray`` (as from :meth:`state_dict` or
            :func:`volconv.load`), or a function ``f(name, tensor)`` that returns the
            array to load or ``None`` to skip that name.
        strict : bool
            Require the names to match exactly. Otherwise missing and unused names
            are logged as warnings and missing parameters keep their values.

        Raises
        ------
        ValueError
            ``state_dict`` is neither a dict nor callable, or a shape differs:
            "param `weight` shape mismatch, should be (4, 2, 3, 3, 3), get (4, 2, 3, 3, 2)".
        TypeError
            A value is not a numpy array (MegEngine raises AssertionError with
            this text), or has a non-numeric dtype.
        KeyError
            With ``strict``: unused or missing names.

        Notes
        -----
        Unlike MegEngine, every check and conversion runs before anything is
        changed, so a failed load leaves the module exactly as it was. Data is
        copied and converted to each parameter's dtype (float64 and float16 arrays load into float32
        parameters; MegEngine crashes on float64 and switches the parameter's
        dtype for float16).

        Examples
        --------
        >>> import numpy as np, volconv.module as M
        >>> a, b = M.Conv3d(2, 4, 3), M.Conv3d(2, 4, 3)
        >>> b.load_state_dict(a.state_dict())
        >>> bool(np.array_equal(a.weight.numpy(), b.weight.numpy()))
        True
        """
        unused: set = set()
        if isinstance(state_dict, dict):
            source = state_dict
            unused = set(source)

            def closure(key, _tensor):
                return source.get(key)

        elif callable(state_dict):
            closure = state_dict
        else:
            raise ValueError(f"`state_dict` must load a dict or callable, got {type(state_dict)}")

        updates: list[tuple[Tensor, np.ndarray]] = []
        loaded: set[str] = set()
        missing: set[str] = set()
        for key, tensor in self._state_items():
            value = closure(key, tensor)
            if value is None:
                missing.add(key)
                continue
            updates.append((tensor, _checked_array(key, tensor, value)))
            loaded.add(key)
        unused -= loaded

        for label, names in (("Unused", unused), ("Missing", missing)):
            if not names:
                continue
            if strict:
                raise KeyError(
                    f"{label} params violate `strict=True`, {label.lower()}={_set_repr(names)}"
                )
            logger.warning(
                "%s params in `strict=False` mode, %s=%s", label, label.lower(), _set_repr(names)
            )
        # Convert every value before touching any tensor: a failing conversion (a float64
        # that overflows float32, with warnings raised as errors) then changes nothing.
        converted = [(tensor, np.array(value, dtype=tensor.dtype)) for tensor, value in updates]
        for tensor, value in converted:
            tensor._data = value  # a fresh copy in the tensor's dtype (what set_value makes)

    # ---- repr -----------------------------------------------------------------------------------
    def _module_info_string(self) -> str:
        """The one-line description shown inside ``ClassName(...)``; empty by default."""
        return ""

    def __repr__(self) -> str:
        info = self._module_info_string()
        extra_lines = info.split("\n") if info else []
        child_lines = []
        for name in self._modules:
            if name in _HOOK_ATTRS:
                continue
            value = self.__dict__.get(name)
            if _is_module(value):
                child_lines.append(f"({name}): {_indent(repr(value), 2)}")
                continue
            for key, leaf in _expand(name, value):
                if _is_module(leaf):
                    child_lines.append(f"({key}): {_indent(repr(leaf), 2)}")
        lines = extra_lines + child_lines
        body = ""
        if len(extra_lines) == 1 and not child_lines:
            body = extra_lines[0]
        elif lines:
            body = "\n  " + "\n  ".join(lines) + "\n"
        return f"{type(self).__name__}({body})"


def _checked_array(key: str, tensor: Tensor, value) -> np.ndarray:
    """Validate one incoming value for ``tensor``; return it (unchanged) or raise."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"closure should return a `np.ndarray`, now `{key}` get {value!r}")
    if value.dtype.kind not in "biuf":
        raise TypeError(
            f"param `{key}` must be a numeric array to load into a {tensor.dtype} parameter, "
            f"got dtype {value.dtype}"
        )
    if tuple(value.shape) != tuple(tensor.shape):
        raise ValueError(
            f"param `{key}` shape mismatch, should be {tuple(tensor.shape)}, "
            f"get {tuple(value.shape)}"
        )
    return value
