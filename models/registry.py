"""Name registry of the model zoo: ``@register_model(...)`` entrypoints, their metadata, ``create_model``.

Every entry carries what the training scripts and tools need to know about a network, so that no
tool guesses it from the name: the data family it is built for (``cifar``: 32 px, 10 classes by
default; ``imagenet``: 224 px, 1000 classes), whether it is binary, its full-precision twin, and its
training recipe (:mod:`models.recipes`).
"""
import dataclasses

_MODELS = {}

FAMILIES = {"cifar": {"image_size": 32, "num_classes": 10},
            "imagenet": {"image_size": 224, "num_classes": 1000}}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one model."""
    name: str
    family: str          # "cifar" or "imagenet": input size and default classes, see FAMILIES
    binary: bool         # True: 1-bit weights and activations in its BinarizeConv2d layers
    fp_twin: str         # name of the full-precision network of the same shape (itself for FP models)
    recipe: dict         # training flags as in its reference script (models.recipes)

    @property
    def image_size(self):
        """Side of the square input the network is built for, in pixels."""
        return FAMILIES[self.family]["image_size"]

    @property
    def num_classes(self):
        """Classifier width of the family's standard data set."""
        return FAMILIES[self.family]["num_classes"]


def register_model(family, binary, fp_twin, recipe):
    """Decorator: register ``fn(num_classes=...) -> nn.Module`` under its function name with its metadata."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")

    def decorate(fn):
        if fn.__name__ in _MODELS:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        _MODELS[fn.__name__] = (fn, ModelInfo(fn.__name__, family, binary, fp_twin or fn.__name__, dict(recipe)))
        return fn
    return decorate


def list_models(binary=None):
    """Sorted names of every registered model (only binary or only FP ones when ``binary`` is given)."""
    return sorted(n for n, (_, info) in _MODELS.items() if binary is None or info.binary == binary)


def _check(name):
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")


def model_info(name):
    """The :class:`ModelInfo` of ``name``; an unknown name raises ValueError listing the known ones."""
    _check(name)
    return _MODELS[name][1]


def create_model(name, **kwargs):
    """Build the model called ``name``; an unknown name raises ValueError listing the known ones."""
    _check(name)
    return _MODELS[name][0](**kwargs)
