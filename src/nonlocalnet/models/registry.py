"""``build_model(arch, num_classes, **options)``, ``register_model`` and ``list_models()``.

``arch`` is one of

* a bundled or registered name (``list_models()``): ``preresnet20``, ``resnet50``, ...;
* ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, num_classes=..., **options)``;
* ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=..., **options)``;
* ``package.module:callable``: the user's own factory, imported and called with ``num_classes=...`` (when its
  signature takes it) and ``**options``.

Nothing is downloaded: torchvision and timm models are always built without weights (pretrained weights come
only from a local file, ``model.pretrained`` in a config or :func:`nonlocalnet.runs.load_pretrained`).
torchvision and timm are the optional extra ``vision`` (``pip install nonlocalnet[vision]``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from .preresnet import PreResNet
from .resnet import resnet50, resnet50_cifar
from .resnet3d import resnet3d18, resnet3d50

__all__ = ["build_model", "check_outputs", "is_user_arch", "list_models", "register_model"]

Factory = Callable[..., nn.Module]

_ARCHS: dict[str, Factory] = {
    "preresnet20": partial(PreResNet, 20),
    "preresnet56": partial(PreResNet, 56),
    "preresnet110": partial(PreResNet, 110),
    "preresnet164": partial(PreResNet, 164),
    "preresnet8": partial(PreResNet, 8),
    "resnet50": resnet50,
    "resnet50_cifar": resnet50_cifar,
    "resnet3d18": resnet3d18,
    "resnet3d50": resnet3d50,
}
_BUNDLED = frozenset(_ARCHS)
PREFIXES = ("torchvision", "timm")
_NO_DOWNLOAD = {"torchvision": ("weights", "weights_backbone", "pretrained"), "timm": ("pretrained",
                                                                                       "pretrained_cfg_overlay")}


def _key(name: str) -> str:
    return name.lower().replace("-", "")


def list_models() -> list[str]:
    """Names accepted by :func:`build_model` besides ``torchvision:``, ``timm:`` and ``module:callable``."""
    return list(_ARCHS)


def register_model(name: str, factory: Factory | None = None, *, overwrite: bool = False):
    """Register ``factory(num_classes=..., **options) -> nn.Module`` under ``name`` (then usable as
    ``model.arch: name`` in a config run in the same process). Also a decorator: ``@register_model("mynet")``.

    ``name`` may not contain ``:`` (those are factory specs) nor replace a bundled model; re-registering a
    name needs ``overwrite=True``.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"register_model: name must be a non-empty string without ':', got {name!r}")

    def add(f: Factory) -> Factory:
        if not callable(f):
            raise TypeError(f"register_model({name!r}): factory must be callable, got {type(f).__name__}")
        key = _key(name)
        if key in _BUNDLED:
            raise ValueError(f"register_model: {name!r} is a bundled model; choose another name")
        if key in _ARCHS and not overwrite and _ARCHS[key] is not f:
            raise ValueError(f"register_model: {name!r} is already registered; pass overwrite=True to replace it")
        _ARCHS[key] = f
        return f

    return add if factory is None else add(factory)


def _missing_extra(module: str, e: ImportError) -> ValueError:
    return ValueError(f"model.arch '{module}:...' needs {module}, which is not installed ({e}); install the "
                      "extra: pip install nonlocalnet[vision]")


def _import_torchvision():
    try:
        import torchvision  # optional extra `vision`: imported lazily, only for torchvision: archs
    except ImportError as e:
        raise _missing_extra("torchvision", e) from None
    return torchvision


def _import_timm():
    try:
        import timm  # optional extra `vision`: imported lazily, only for timm: archs
    except ImportError as e:
        raise _missing_extra("timm", e) from None
    return timm


def _check_no_download(prefix: str, name: str, options: dict[str, Any]) -> None:
    bad = [k for k in _NO_DOWNLOAD[prefix] if options.get(k) not in (None, False)]
    if bad:
        raise ValueError(f"arch {prefix}:{name}: option(s) {', '.join(bad)} would download weights; nothing is "
                         "downloaded here: build without them and give a local file as model.pretrained "
                         "(Python: nonlocalnet.runs.load_pretrained(model, path))")


def _torchvision(name: str, num_classes: int, options: dict[str, Any]) -> nn.Module:
    _check_no_download("torchvision", name, options)
    tv = _import_torchvision()
    names = tv.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5)
        raise ValueError(f"unknown torchvision model {name!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                                  else "; see torchvision.models.list_models()"))
    opts = {k: v for k, v in options.items() if k not in _NO_DOWNLOAD["torchvision"]}
    return tv.models.get_model(name, weights=None, num_classes=num_classes, **opts)


def _timm(name: str, num_classes: int, options: dict[str, Any]) -> nn.Module:
    _check_no_download("timm", name, options)
    timm = _import_timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ValueError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                            else "; see timm.list_models()"))
    opts = {k: v for k, v in options.items() if k not in _NO_DOWNLOAD["timm"]}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **opts)


def _factory_from_spec(spec: str) -> Factory:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"arch {spec!r}: a factory is given as 'package.module:callable'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"arch {spec!r}: cannot import module {mod_name!r} ({e}); is it installed or on "
                         "PYTHONPATH?") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"arch {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"arch {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable returning an nn.Module")
    return obj


def _takes(f: Callable, arg: str) -> bool:
    try:
        params = inspect.signature(f).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == arg or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def is_user_arch(arch: str) -> bool:
    """Whether ``arch`` is the user's own model (a ``package.module:callable`` or a :func:`register_model` name),
    not a bundled, torchvision or timm one."""
    prefix, sep, _ = arch.partition(":")
    return (sep and prefix not in PREFIXES) or (not sep and _key(arch) in _ARCHS and _key(arch) not in _BUNDLED)


def _check_options(arch: str, factory: Callable, options: dict[str, Any]) -> None:
    """Options the factory's signature does not take: a ValueError listing the ones it does."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if n != "num_classes" and p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = [k for k in options if k not in valid]
    if unknown:
        close = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
        hint = "; ".join(f"did you mean {c[0]!r} for {k!r}?" for k, c in close.items() if c)
        raise ValueError(f"arch {arch!r}: unknown option(s) {', '.join(map(repr, unknown))} (model.options); valid "
                         f"options: {', '.join(valid) or 'none'}" + (f"; {hint}" if hint else ""))


def _factory_name(factory: Callable) -> str:
    f = getattr(factory, "func", factory)  # a functools.partial
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__name__)}"


def check_outputs(model: nn.Module, num_classes: int, input_shape: tuple[int, ...], arch: str) -> None:
    """A forward pass on zeros of shape ``(2, *input_shape)`` must give logits ``(2, num_classes)``; a ValueError
    naming ``arch`` otherwise (a factory that ignores ``num_classes``, a model that returns features, ...)."""
    modes = {m: m.training for m in model.modules()}
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.get_default_dtype())
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros((2, *input_shape), dtype=dtype, device=device))
    except Exception as e:  # noqa: BLE001 - the user's model, any failure: say where it came from
        raise ValueError(f"arch {arch!r}: a forward pass on an input of shape (2, {', '.join(map(str, input_shape))}) "
                         f"failed: {type(e).__name__}: {e}") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    if shape != (2, num_classes):
        got = f"a {type(out).__name__}" if shape is None else f"shape {shape}"
        raise ValueError(f"arch {arch!r}: the model gives {got} for a batch of 2, expected logits (2, {num_classes}) "
                         f"for num_classes={num_classes} (the data's classes, or model.num_classes): does its factory "
                         "ignore num_classes?")


def build_model(arch: str, num_classes: int, **options) -> nn.Module:
    """Build a backbone + classifier from ``arch`` (see the module docstring).

    ``options`` go to the constructor: ``bottleneck``/``widths``/``in_channels`` for ``preresnet*``;
    ``zero_init_residual``/``in_channels`` for ``resnet50*``; ``conv1_t_size``/``conv1_t_stride``/
    ``no_max_pool``/``in_channels`` for ``resnet3d*``; the library's own keyword arguments for
    ``torchvision:``/``timm:`` (e.g. ``img_size`` for a timm ViT); anything for a user factory.
    """
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch must be a model name or 'prefix:name', got {arch!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"arch {arch!r}: num_classes must be a positive integer (the classifier's outputs), got "
                         f"{num_classes!r}")
    prefix, sep, rest = arch.partition(":")
    if sep and prefix in PREFIXES:
        if not rest:
            raise ValueError(f"arch {arch!r}: give the model name after '{prefix}:'")
        try:
            model = (_torchvision if prefix == "torchvision" else _timm)(rest, num_classes, dict(options))
        except TypeError as e:
            raise ValueError(f"arch {arch!r}: {e} (model.options go to the {prefix} constructor)") from None
    else:
        if sep:
            factory = _factory_from_spec(arch)
        else:
            key = _key(arch)
            if key not in _ARCHS:
                lib, dot, name = arch.partition(".")
                hint = f" (did you mean '{lib}:{name}'?)" if dot and lib in PREFIXES and name else ""
                raise ValueError(f"unknown arch {arch!r}{hint}; valid archs: {', '.join(_ARCHS)}, or "
                                 "torchvision:NAME, timm:NAME, package.module:callable")
            factory = _ARCHS[key]
        _check_options(arch, factory, options)
        kwargs = dict(options)
        if _takes(factory, "num_classes"):
            kwargs["num_classes"] = num_classes
        try:
            model = factory(**kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the user's code is named, not a traceback
            if not (is_user_arch(arch) or isinstance(e, TypeError | ValueError)):
                raise
            raise ValueError(f"arch {arch!r}: its factory {_factory_name(factory)} raised {type(e).__name__}: "
                             f"{e}") from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"arch {arch!r} returned a {type(model).__name__}, not an nn.Module")
    return model
