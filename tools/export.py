"""Export a trained binary network to a packed 1-bit file, and load that file back as an ``nn.Module``.

    python -m tools.export CHECKPOINT OUT [--check digits|fake] [--no_fold]
    python -m tools.export STATE_DICT OUT --model resnet20_1w1a --num_classes 10

CHECKPOINT is one of this project's checkpoints (``utils/checkpoint.py``) or a bare state dict (then
``--model`` and ``--num_classes`` say what it is). The script prints the size of the fp32 state dict
(``torch.save(model.state_dict())``), the size of OUT and their ratio; ``--check`` also runs the
original and the reloaded network on a whole validation set and fails unless every prediction agrees.
A folded network may disagree where folding's rounding flips a sign (below); the check then also
runs the same packed weights with the batch norms kept, says so, and passes only if that network
reproduces the original exactly and the folded one differs on at most 1 % of the images.

File format (a plain dict, ``torch.save``'d, readable with ``weights_only=True``)::

    format          "lcr-bnn-packed"
    format_version  1
    model           registry name (models.create_model rebuilds the architecture)
    num_classes     classifier width
    binary_layers   {module name: layer} for every BinarizeConv2d, each layer a dict of
                      bits      uint8 (out, ceil(in/groups*kh*kw / 8)): weight signs, 8 per byte
                                (bit layout in modules/xnor.py)
                      shape     [out, in/groups, kh, kw]
                      exponent  int8 (out,): the power-of-two scale is 2**exponent
                      stride, padding, dilation  [h, w] each;  groups  int;  padding_mode  str
                      bias      float (out,) or None (the layer's own bias; None in the zoo)
                      bn_scale, bn_shift  float32 (out,) or None: a folded batch norm (below)
    folded          {batch-norm module name: name of the layer it was folded into}
    state_dict      every other parameter and buffer as it was (stem, 1x1 downsampling convs,
                    classifier, batch norms that were not folded), plus the folded FP convs' new
                    weight and bias

Batch-norm folding (eval statistics; ``--no_fold`` turns it off). A BatchNorm that directly consumes
the output of a convolution, where that output has no other consumer and both modules run once per
forward (found by tracing the model with ``torch.fx``), is removed and replaced as follows:

- after a full-precision conv: ``W' = W * a``, ``b' = beta + (b - mean) * a`` with
  ``a = gamma / sqrt(var + eps)``, computed in float64 then stored in the conv's dtype. Exact in
  real arithmetic; in float32 the conv sums in a different order, so outputs move by about one
  rounding error (~1e-7 relative).
- after a binary conv: the signs cannot absorb an affine, so the layer keeps its bits and exponent
  and stores ``bn_scale = gamma / sqrt(var + eps)`` and ``bn_shift = beta - mean * bn_scale`` in
  float32. The loaded layer multiplies the exact integer popcount result by
  ``2**exponent * bn_scale`` (formed exactly: a power-of-two multiple) and adds ``bn_shift``. That is
  the eval batch norm of ``dot * 2**exponent`` in real arithmetic; torch's batch-norm kernel rounds
  differently, so about a third of the outputs differ from it in the last bit or two.

Not folded, and kept as they are: a BatchNorm after a max-pool (VGG-Small pools between conv and BN;
the pool commutes with the affine only where gamma > 0), one whose input also feeds something else,
one without running statistics, and the BatchNorm1d before the classifier (it would fold into the
linear layer, but nothing here needs the few kilobytes). A rounding-level change of a real activation
that later passes through ``sign()`` flips that sign if the activation is within a rounding error of
0; that is rare, but where it happens the logits move by more than a rounding error (the README's
quick-start network as its test trains it, at commit 62bf32d, 62 % top-1 on digits: 1 of the 450
validation predictions changed, max |logit diff| 1.9; with ``--no_fold`` none).

With ``--no_fold`` (or ``fold=False``) the reloaded network reproduces the original bit for bit on
the CPU: packed bits times a power of two are exactly the weights ``BinarizeConv2d`` convolves with,
and sums of ``+-2**e`` terms are exact in float32 (a GPU may pick a Winograd convolution, which
rounds).

:func:`load_packed` rebuilds the network from the file alone: ``models.create_model(model,
num_classes)``, folded BatchNorms replaced by ``nn.Identity``, every binary conv by
:class:`modules.xnor.PackedBinaryConv2d` (``reference=True`` selects its XNOR-popcount path), then the
remaining state dict loaded strictly; the result is in eval mode and is inference-only.
"""
if __package__ in (None, ""):  # run as a file: the imports below need the repository root on the path
    import sys
    sys.exit("run the tools from the repository root as modules: python -m tools.export " + " ".join(sys.argv[1:]))

import argparse
import io
import os
import sys

import torch
import torch.fx
import torch.nn as nn
from torch.utils.data import DataLoader

import models
from modules.binary import BinarizeConv2d
from modules.xnor import PackedBinaryConv2d, pack_signs, set_xnor_reference
from utils.checkpoint import CheckpointError, load_file, read_model, save_atomic
from utils.data import build_datasets
from utils.outputs import OutputError, check_output

__all__ = ["PACKED_FORMAT", "PACKED_VERSION", "ExportError", "input_spec", "find_bn_folds",
           "export_packed", "build_packed_model", "load_packed", "fp32_size_bytes", "serialized_size",
           "compare_on", "main"]

PACKED_FORMAT = "lcr-bnn-packed"
PACKED_VERSION = 1



class ExportError(Exception):
    """A model or file that cannot be exported or loaded as packed; one line saying why."""


def input_spec(model_name):
    """``(num_classes, image side in px)`` a zoo model is built for (its registry entry)."""
    info = models.model_info(model_name)
    return info.num_classes, info.image_size


class _LeafBinaryTracer(torch.fx.Tracer):
    """fx tracer that keeps ``BinarizeConv2d`` whole (its autograd Function does not trace)."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, BinarizeConv2d) or super().is_leaf_module(m, qualname)


def find_bn_folds(model):
    """``{bn name: conv name}`` for every BatchNorm2d that may be folded (module docstring rules)."""
    try:
        graph = _LeafBinaryTracer().trace(model)
    except Exception as exc:  # fx raises many types for code it cannot follow
        raise ExportError(f"cannot trace {type(model).__name__} to find batch norms to fold "
                          f"({type(exc).__name__}: {exc}); export with --no_fold") from None
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folds = {}
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        bn = model.get_submodule(node.target)
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.running_var is None:
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or calls[src.target] != 1:
            continue
        conv = model.get_submodule(src.target)
        if isinstance(conv, nn.Conv2d) and len(src.users) == 1:
            folds[node.target] = src.target
    return folds


def _bn_affine(bn):
    """Eval-mode ``(scale, shift)`` of a BatchNorm in float32: ``bn(x) = x * scale + shift``."""
    invstd = 1 / torch.sqrt(bn.running_var.float() + bn.eps)
    scale = invstd if bn.weight is None else invstd * bn.weight.float()
    beta = torch.zeros_like(scale) if bn.bias is None else bn.bias.float()
    return scale, beta - bn.running_mean.float() * scale


def _fold_fp_conv(conv, bn):
    """Weight and bias of ``conv`` with the eval ``bn`` after it folded in (float64, then conv's dtype)."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    scale = 1 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    beta = torch.zeros_like(mean) if bn.bias is None else bn.bias.double()
    bias = torch.zeros_like(mean) if conv.bias is None else conv.bias.double()
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    return weight.to(conv.weight.dtype), (beta + (bias - mean) * scale).to(conv.weight.dtype)


def _pack_binary_conv(name, conv):
    """Sign bits and per-filter exponent of a ``BinarizeConv2d``, from its own ``binary_weight()``."""
    if isinstance(conv.padding, str):
        raise ExportError(f"binary conv {name} uses padding={conv.padding!r}; only integer padding "
                          f"is supported")
    weight = conv.binary_weight().float()
    magnitude = weight.abs().flatten(1)
    scale = magnitude[:, 0]
    mantissa, exp = torch.frexp(scale)
    if not (torch.isfinite(scale).all() and (magnitude == scale[:, None]).all() and (mantissa == 0.5).all()):
        raise ExportError(f"binary conv {name} has a filter whose scale is not a finite power of two "
                          f"(a constant filter has std 0); retrain or re-initialise it")
    exponent = exp - 1
    if exponent.min() < -126 or exponent.max() > 127:
        raise ExportError(f"binary conv {name} has scale exponents outside int8/float32 range")
    return {
        "bits": pack_signs(weight),
        "shape": list(weight.shape),
        "exponent": exponent.to(torch.int8),
        "stride": list(conv.stride),
        "padding": list(conv.padding),
        "dilation": list(conv.dilation),
        "groups": int(conv.groups),
        "padding_mode": conv.padding_mode,
        "bias": None if conv.bias is None else conv.bias.detach().clone(),
        "bn_scale": None,
        "bn_shift": None,
    }


@torch.no_grad()
def export_packed(model, model_name, num_classes, fold=True):
    """The packed-file dict of ``model`` (a zoo model with its trained weights); see the module docstring."""
    folds = find_bn_folds(model) if fold else {}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    binary = {}
    for name, m in model.named_modules():
        if isinstance(m, BinarizeConv2d):
            binary[name] = _pack_binary_conv(name, m)
    dropped = set(binary)
    for bn_name, conv_name in folds.items():
        bn, conv = model.get_submodule(bn_name), model.get_submodule(conv_name)
        if conv_name in binary:
            scale, shift = _bn_affine(bn)
            entry = binary[conv_name]
            if entry["bias"] is not None:
                shift = shift + entry["bias"].float() * scale
                entry["bias"] = None
            entry["bn_scale"], entry["bn_shift"] = scale, shift
        else:
            state[f"{conv_name}.weight"], state[f"{conv_name}.bias"] = _fold_fp_conv(conv, bn)
        dropped.add(bn_name)
    state = {k: v for k, v in state.items() if not any(k.startswith(p + ".") for p in dropped)}
    return {
        "format": PACKED_FORMAT,
        "format_version": PACKED_VERSION,
        "model": model_name,
        "num_classes": int(num_classes),
        "binary_layers": binary,
        "folded": dict(folds),
        "state_dict": state,
    }


def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _with_bias(conv):
    """A copy of ``nn.Conv2d`` ``conv``'s hyper-parameters with a bias (its weights are loaded later)."""
    return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)


def build_packed_model(packed, reference=False):
    """An eval-mode ``nn.Module`` from a packed-file dict; ``reference`` uses the XNOR-popcount path."""
    if packed.get("format") != PACKED_FORMAT:
        raise ExportError(f"not a packed LCR-BNN file (format {packed.get('format')!r}); "
                          f"make one with python -m tools.export")
    if packed.get("format_version", 0) > PACKED_VERSION:
        raise ExportError(f"packed file has format version {packed['format_version']}, newer than this "
                          f"code's {PACKED_VERSION}; update the code")
    model = models.create_model(packed["model"], num_classes=packed["num_classes"])
    binary = packed["binary_layers"]
    for bn_name, conv_name in packed["folded"].items():
        _replace(model, bn_name, nn.Identity())
        conv = model.get_submodule(conv_name)
        if conv_name not in binary and conv.bias is None:
            _replace(model, conv_name, _with_bias(conv))
    for name, e in binary.items():
        _replace(model, name, PackedBinaryConv2d(e["bits"], e["shape"], e["exponent"], e["stride"],
                                                 e["padding"], e["dilation"], e["groups"], e["bias"],
                                                 e["bn_scale"], e["bn_shift"], e["padding_mode"]))
    missing, unexpected = model.load_state_dict(packed["state_dict"], strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in binary]
    if missing or unexpected:
        raise ExportError(f"packed file does not fit model {packed['model']}: {len(missing)} missing "
                          f"keys (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})")
    set_xnor_reference(model, reference)
    return model.eval()


def load_packed(path, reference=False):
    """Read a packed file (``weights_only``) and rebuild its network; see :func:`build_packed_model`."""
    try:
        return build_packed_model(load_file(path), reference)
    except KeyError as exc:
        raise ExportError(f"packed file {path} lacks the key {exc}; re-export it") from None


def serialized_size(obj):
    """Bytes that ``torch.save(obj)`` writes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def fp32_size_bytes(model):
    """Bytes of ``torch.save(model.state_dict())``: the fp32 checkpoint a packed file replaces."""
    return serialized_size(model.state_dict())


# The share of --check images whose folded prediction may differ from the original while the same
# packed weights with the batch norms kept agree exactly: a rounding flip is rare (one of 450 digits
# images in the README's test network), a wrong fold moves many.
FOLD_FLIPS_TOLERATED = 0.01


@torch.no_grad()
def compare_on(original, packed, loader):
    """Run both networks over ``loader``: top-1 of each (%), differing predictions, max |logit diff|."""
    original.eval()
    packed.eval()
    correct_a = correct_b = differ = total = 0
    max_diff = 0.0
    for images, labels in loader:
        a, b = original(images), packed(images)
        pred_a, pred_b = a.argmax(1), b.argmax(1)
        correct_a += int((pred_a == labels).sum())
        correct_b += int((pred_b == labels).sum())
        differ += int((pred_a != pred_b).sum())
        max_diff = max(max_diff, float((a - b).abs().max()))
        total += labels.numel()
    return {"top1_original": 100.0 * correct_a / total, "top1_packed": 100.0 * correct_b / total,
            "predictions_differ": differ, "max_logit_diff": max_diff, "images": total}


def _check_loader(kind, model_name, num_classes, batch_size):
    if kind == "digits":
        _, val_set, classes = build_datasets("digits")
        if classes != num_classes:
            raise ExportError(f"--check digits needs a 10-class model, this one has {num_classes}")
    else:
        side = input_spec(model_name)[1]
        _, val_set, _ = build_datasets("fake", fake_size=(1, 64), fake_image_size=side,
                                       fake_num_classes=num_classes)
    return DataLoader(val_set, batch_size=batch_size, shuffle=False)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="our checkpoint (.pth.tar) or a bare state dict")
    p.add_argument("out", help="packed file to write (atomically)")
    p.add_argument("-a", "--model", default=None,
                   help="registry name; needed for a bare state dict (default: from the checkpoint)")
    p.add_argument("--num_classes", type=int, default=None,
                   help="classifier width; needed for a bare state dict (default: from the checkpoint)")
    p.add_argument("--no_fold", action="store_true", help="keep every batch norm as it is (default: fold)")
    p.add_argument("--check", choices=("digits", "fake"), default=None,
                   help="compare original and reloaded network on digits' validation split or 64 fake "
                        "images (default: no check)")
    p.add_argument("--reference", action="store_true",
                   help="run the check through the XNOR-popcount path (slow; default: unpacked F.conv2d)")
    p.add_argument("-b", "--batch_size", type=int, default=100, help="check batch size (default 100)")
    p.add_argument("--force", action="store_true", help="replace an OUT that this tool did not write")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        check_output(args.out, PACKED_FORMAT, inputs=[args.checkpoint], force=args.force, flag="OUT")
        model, meta = read_model(args.checkpoint, args.model, args.num_classes)
        name, classes = meta["model"], meta["num_classes"]
        packed = export_packed(model, name, classes, fold=not args.no_fold)
        save_atomic(packed, args.out)
        reloaded = load_packed(args.out, reference=args.reference)
    except (CheckpointError, ExportError, OutputError, ValueError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.out} ({exc.strerror or type(exc).__name__}); pass another OUT",
              file=sys.stderr)
        return 2
    fp32, size = fp32_size_bytes(model), os.path.getsize(args.out)
    kept = sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in reloaded.modules())
    print(f"{name} ({classes} classes): {len(packed['binary_layers'])} binary convs packed, "
          f"{len(packed['folded'])} batch norms folded, {kept} kept")
    print(f"fp32 state dict {fp32:,} bytes, packed {size:,} bytes, compression {fp32 / size:.1f}x; "
          f"wrote {args.out}")
    if args.check:
        loader = _check_loader(args.check, name, classes, args.batch_size)
        r = compare_on(model, reloaded, loader)
        print(f"check on {args.check} ({r['images']} images): top-1 original {r['top1_original']:.2f} %, "
              f"packed {r['top1_packed']:.2f} %, {r['predictions_differ']} predictions differ, "
              f"max |logit diff| {r['max_logit_diff']:.3g}")
        if r["predictions_differ"] and not args.no_fold:
            kept_bn = build_packed_model(export_packed(model, name, classes, fold=False), reference=args.reference)
            u = compare_on(model, kept_bn, loader)
            rare = r["predictions_differ"] <= max(1, FOLD_FLIPS_TOLERATED * r["images"])
            verdict = ""
            if u["predictions_differ"] == 0:
                verdict = ("; the few folded differences come from folding's rounding flipping signs that sit within "
                           "a rounding error of 0" if rare else
                           "; the folded differences are too many for rounding: the fold is wrong")
            print(f"the same packed weights with every batch norm kept (--no_fold): {u['predictions_differ']} "
                  f"predictions differ, max |logit diff| {u['max_logit_diff']:.3g}{verdict}")
            if u["predictions_differ"] == 0 and rare:
                return 0
        if r["predictions_differ"]:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
