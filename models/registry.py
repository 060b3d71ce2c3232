"""Name registry of the model zoo: ``@register_model`` entrypoints and ``create_model(name, **kw)``."""

_MODELS = {}


def register_model(fn):
    """Register ``fn`` (``fn(num_classes=..., **kw) -> nn.Module``) under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models():
    """Sorted names of every registered model."""
    return sorted(_MODELS)


def create_model(name, **kwargs):
    """Build the model called ``name``; an unknown name raises ValueError listing the known ones."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
