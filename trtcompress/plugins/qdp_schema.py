"""The signature rules TensorRT's quickly-deployable plugins (`tensorrt.plugin`) apply at registration.

`tensorrt.plugin` reads the register / autotune / aot_impl functions with `inspect.signature` and refuses
them unless: register takes the input TensorDescs first, then attributes of serializable types (int,
float, bytes, bool, str), all positional-or-keyword, annotated with real classes (so a module with
`from __future__ import annotations`, whose annotations are strings, cannot define them), without
defaults, and returns TensorDesc(s); autotune takes (inputs, a subset of the attributes in order,
outputs) and returns AutoTuneCombination or a list of them; aot_impl takes (inputs, every attribute,
outputs, tactic) and must declare its return type, a 4-tuple (str | bytes, str | bytes,
KernelLaunchParams, SymExprs). `check_plugin_functions` applies those rules without TensorRT (given the
classes the functions were annotated with), so the tests catch a plugin TensorRT would refuse.
"""

import inspect
import types
import typing
from typing import Any

SERIALIZABLE = (int, float, bytes, bool, str)
RESERVED_ATTRS = {"outputs", "stream", "tactic"}


def check_register(fn, tensor_desc: type) -> tuple[list[str], dict[str, type]]:
    """(input tensor names, attribute types) of a register function, or ValueError naming the problem."""
    tensors: list[str] = []
    attrs: dict[str, type] = {}
    sig = inspect.signature(fn)
    for name, p in sig.parameters.items():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise ValueError(
                f"register: {name} must be a positional-or-keyword argument (no *args / **kwargs)"
            )
        if p.annotation is p.empty or isinstance(p.annotation, str):
            raise ValueError(
                f"register: {name} needs a type annotation that is a class, got {p.annotation!r}"
            )
        if p.default is not p.empty:
            raise ValueError(f"register: {name} has a default value")
        if inspect.isclass(p.annotation) and issubclass(p.annotation, tensor_desc):
            if attrs:
                raise ValueError(f"register: TensorDesc {name} after an attribute")
            tensors.append(name)
        elif p.annotation in SERIALIZABLE and name not in RESERVED_ATTRS:
            if not tensors:
                raise ValueError("register: the input TensorDescs come first")
            attrs[name] = p.annotation
        else:
            raise ValueError(f"register: attribute {name} of type {p.annotation} is not serializable")
    ret = sig.return_annotation
    outs = typing.get_args(ret) if typing.get_origin(ret) is tuple else (ret,)
    if not all(inspect.isclass(o) and issubclass(o, tensor_desc) for o in outs):
        raise ValueError(f"register: must return TensorDesc or a tuple of them, annotated; got {ret!r}")
    return tensors, attrs


def _check_attrs(
    fn, what: str, tensors: list[str], attrs: dict[str, type], tail: list[str], every_attr: bool = False
) -> None:
    sig = inspect.signature(fn)
    used = list(attrs) if every_attr else [n for n in sig.parameters if n in attrs]
    expected = [*tensors, *[a for a in attrs if a in used], *tail]
    if list(sig.parameters) != expected:
        raise ValueError(f"{what}: parameters {list(sig.parameters)}, TensorRT expects {expected}")
    for name in used:
        ann = sig.parameters[name].annotation
        if ann is not inspect.Parameter.empty and ann != attrs[name]:
            raise ValueError(f"{what}: {name} annotated {ann!r}, registered as {attrs[name]}")


def check_plugin_functions(register, autotune, aot_impl, trtp: Any) -> None:
    """All the rules above for one plugin; `trtp` = the module (or namespace) whose classes annotate them."""
    tensors, attrs = check_register(register, trtp.TensorDesc)
    if autotune is not None:
        _check_attrs(autotune, "autotune", tensors, attrs, ["outputs"])
        ret = inspect.signature(autotune).return_annotation
        if ret is not inspect.Parameter.empty:
            items = typing.get_args(ret) if typing.get_origin(ret) is list else (ret,)
            if not items or not all(
                inspect.isclass(i) and issubclass(i, trtp.AutoTuneCombination) for i in items
            ):
                raise ValueError(
                    f"autotune: return annotation {ret!r} is not (a list of) AutoTuneCombination"
                )
    # tensorrt.plugin's own check lets aot_impl take a subset of the attributes, but at build time
    # _TemplateAOTPlugin.get_launch_params calls it with every attribute, positionally (_plugin_class.py,
    # TensorRT 10.9 to 10.16): a subset would receive the wrong values.
    _check_attrs(aot_impl, "aot_impl", tensors, attrs, ["outputs", "tactic"], every_attr=True)
    ret = inspect.signature(aot_impl).return_annotation
    args = typing.get_args(ret) if typing.get_origin(ret) is tuple else ()
    if len(args) != 4:
        raise ValueError(f"aot_impl: TensorRT requires the return annotation tuple[str | bytes, str | bytes, "
                         f"KernelLaunchParams, SymExprs], got {ret!r}")  # fmt: skip
    for i in (0, 1):
        union = typing.get_origin(args[i]) in (typing.Union, types.UnionType)
        kinds = typing.get_args(args[i]) if union else (args[i],)
        if not all(k in (str, bytes) for k in kinds):
            raise ValueError(f"aot_impl: return item {i} must be str or bytes, got {args[i]!r}")
    if not issubclass(args[2], trtp.KernelLaunchParams) or not issubclass(args[3], trtp.SymExprs):
        raise ValueError(f"aot_impl: return items 2, 3 must be KernelLaunchParams, SymExprs; got {args[2:]}")
