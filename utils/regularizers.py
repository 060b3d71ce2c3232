"""The regulariser of a run: the paper form, or the released code's form with its frozen FP network.

``build_regularizer(args, model, num_classes, device, logger)`` returns None for ``--alpha 0``
(plain IR-Net), :class:`modules.lcr.LipschitzRegularizer` for ``--lcr_variant paper`` and
:class:`modules.lcr_official.OfficialLCR` for ``--lcr_variant official``. The official form compares
with a frozen full-precision network (``--model_fp``, by default the model's FP twin) whose weights
come from ``--fp_weights FILE`` (a state dict or one of our checkpoints) or ``--fp_pretrained``
(torchvision's ImageNet weights, which the released code loads: ``resnet18_fp(pretrained=True)``).
"""
import os

import torch

import models
from modules.lcr import LipschitzRegularizer
from modules.lcr_official import OfficialLCR
from utils import checkpoint as ckpt

# our FP twins that are torchvision's networks, and torchvision's names for them
TORCHVISION_WEIGHTS = {"resnet18_fp": ("resnet18", "ResNet18_Weights"), "resnet34_fp": ("resnet34", "ResNet34_Weights")}


class RegularizerError(Exception):
    """The regulariser cannot be built as the flags ask; one line."""


def torchvision_weights(name):
    """torchvision's ImageNet state dict for ``resnet18_fp``/``resnet34_fp``, from torch's hub cache
    (``$TORCH_HOME/hub/checkpoints``), downloading it there first when there is a network."""
    import torchvision
    if name not in TORCHVISION_WEIGHTS:
        raise RegularizerError(f"--fp_pretrained has torchvision weights only for {', '.join(TORCHVISION_WEIGHTS)}; "
                               f"pass --fp_weights FILE for {name}")
    arch, enum = TORCHVISION_WEIGHTS[name]
    weights = getattr(torchvision.models, enum).IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # no network, a proxy, a torn download: urllib and torch raise many types
        raise RegularizerError(
            f"could not load torchvision's ImageNet {arch} weights ({type(exc).__name__}); without a network, place "
            f"the file torchvision.models.{enum}.IMAGENET1K_V1.url names at {cached}, or pass --fp_weights FILE"
        ) from None


def load_fp_network(args, num_classes, device, logger):
    """The frozen full-precision network of the official form, with ``--fp_weights``/``--fp_pretrained``."""
    state, source = None, ""
    if args.fp_weights:
        state = ckpt.load_file(args.fp_weights)
        if ckpt.is_training_checkpoint(state):
            ckpt.validate(state, args.fp_weights)
            num_classes = state["num_classes"]
        elif torch.is_tensor(state.get("fc.weight")):
            num_classes = state["fc.weight"].shape[0]
        source = args.fp_weights
    elif args.fp_pretrained:
        state, num_classes, source = torchvision_weights(args.model_fp), 1000, "torchvision's ImageNet weights"
    fp_model = models.create_model(args.model_fp, num_classes=num_classes)
    if state is None:
        logger.warning(f"WARNING: the official LCR form compares with a RANDOM {args.model_fp}; "
                       f"pass --fp_weights FILE or --fp_pretrained for a trained one")
    else:
        ckpt.load_model_weights(fp_model, state, source, args.model_fp, num_classes)
        logger.info(f"official LCR: frozen {args.model_fp} loaded from {source}")
    fp_model = fp_model.to(device)
    return fp_model.to(memory_format=torch.channels_last) if args.channels_last else fp_model


def build_regularizer(args, model, num_classes, device, logger):
    """The LCR loss object for ``--lcr_variant``, or None when ``--alpha 0`` (plain IR-Net)."""
    if args.alpha == 0:
        return None
    try:
        if args.lcr_variant == "paper":
            return LipschitzRegularizer(model, steps=args.lcr_iters or None, surrogate=args.lcr_surrogate,
                                        sigma_f=args.lcr_sigma_f)
        return OfficialLCR(model, load_fp_network(args, num_classes, device, logger), args.batch_size)
    except ValueError as exc:
        raise RegularizerError(f"--lcr_variant {args.lcr_variant} does not fit --model {args.model}: {exc}") from None
