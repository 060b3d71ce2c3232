"""The LCR loss as the authors' released ImageNet code computes it (``--lcr_variant official``).

What the released code (42Shawn/LCR_BNN, ``LCR/imagenet/LCR.py`` and ``main.py``) computes, and
what this module computes (docs/METHOD.md section 4):

- Binary features: the stage outputs ``layer1..layerS`` of the binary ResNet, hardtanh'd and
  scaled by learnable scalars ``gamma[i]`` (released: ``scaleable_feature(x, preReLU=False)``).
- FP features: the stage outputs of a separate frozen full-precision ResNet, **ReLU'd**
  (released: ``extract_feature(x, preReLU=False)``: its blocks end without a ReLU and the extractor
  applies ``F.relu``). Our torchvision-style FP ResNets end each block with a ReLU, so the ReLU is a
  no-op there and the features are the released ones; on the CIFAR FP twins (blocks end in
  hardtanh) it keeps the non-negative part, as the released extractor would.
- For consecutive stages ``i, i+1``::

    RM_i  = retention_matrix(feat_i, feat_{i+1})                 (B x C_i x C_{i+1})
    K_i   = RM_i @ RM_i^T
    est_i = sqrt(| K_i @ 1 |)                                     one power step from all-ones;
                                                                  biased, kept bit-faithful
    L     = sum_i MSE(est_B_i, est_F_i) / 2 ** (S - 1 - i)        i = 0 .. S-2
    loss  = CE + alpha * L / batch_size / 10000

Where this project deliberately differs from the released script: the binary features come from
the forward pass that produces the logits (it ran the binary network a second time, in training
mode, so BatchNorm statistics moved twice per step; the loss value and gradients are the same),
the FP network runs in eval mode under ``no_grad`` (the released code left it in training mode
unless ``model_fp.eval()`` was called elsewhere; it is not), and several devices work (the released
code crashed with DataParallel). The released default FP network is torchvision's
ImageNet-pretrained ResNet-18 (``resnet18_fp(pretrained=True)``); pass ``--fp_pretrained`` or
``--fp_weights FILE`` to use it (``utils/regularizers.py``).
"""
import contextlib
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.lcr import fp32_math, retention_matrix

OFFICIAL_DIVISOR = 10000.0  # the released script divides the loss by batch_size * 10000


def stage_modules(model):
    """The model's stages ``layer1, layer2, ...`` in order (a ResNet's residual stages)."""
    names = sorted((int(m.group(1)), n) for n, _ in model.named_children()
                   if (m := re.fullmatch(r"layer(\d+)", n)))
    stages = [getattr(model, n) for _, n in names]
    if len(stages) < 2:
        raise ValueError(f"the official LCR form needs a ResNet with stages layer1..layerN; "
                         f"{type(model).__name__} has {len(stages)}")
    return stages


def top_eigen_estimate(rm):
    """``sqrt(|K 1|)`` with ``K = RM RM^T``: the released code's one-step eigenvalue estimate, B values."""
    k = torch.bmm(rm, rm.transpose(1, 2))
    return torch.linalg.vector_norm(k.sum(dim=2), dim=1).sqrt()


def official_loss(feats_b, feats_f, gamma=None):
    """``sum_i MSE(est_B_i, est_F_i) / 2**(S-1-i)`` over consecutive pairs of S stage features.

    ``gamma`` (S scalars) scales the binary features. It is applied to the small retention
    matrices, ``RM(g_i f_i, g_j f_j) = g_i g_j RM(f_i, f_j)`` (pooling is linear), so no scaled copy
    of a feature map is kept for the backward pass.
    """
    s = len(feats_b)
    total = 0.0
    for i in range(s - 1):
        rm_b = retention_matrix(feats_b[i], feats_b[i + 1])
        if gamma is not None:
            rm_b = rm_b * (gamma[i] * gamma[i + 1])
        est_b = top_eigen_estimate(rm_b)
        est_f = top_eigen_estimate(retention_matrix(feats_f[i], feats_f[i + 1]))
        total = total + F.mse_loss(est_b, est_f) / 2 ** (s - 1 - i)
    return total


def _gather(tensors, device):
    """Concatenate per-device chunks on ``device``; a single chunk is used as it is (no copy)."""
    if len(tensors) == 1:
        return tensors[0].to(device)
    return torch.cat([t.to(device) for t in tensors])


class OfficialLCR:
    """Released-code LCR with the fixes listed in the module docstring.

    Same protocol as :class:`modules.lcr.LipschitzRegularizer`: ``with reg.record(): logits =
    model(x)``, then ``lcr, logs = reg.loss()``. ``loss()`` already includes ``1 / (batch_size * 10000)``, so
    the training loop multiplies it by ``alpha * weight_scale`` with ``weight_scale = 1``.
    ``gamma`` (one scalar per stage) is trained with the network: add :meth:`parameters` to the
    optimizer and keep :meth:`state_dict` in checkpoints.
    """

    weight_scale = 1.0

    def __init__(self, model, fp_model, batch_size):
        self.stages = stage_modules(model)
        self.fp_stages = stage_modules(fp_model)
        if len(self.stages) != len(self.fp_stages):
            raise ValueError(f"binary and FP networks have {len(self.stages)} and {len(self.fp_stages)} stages")
        self.model = model
        self.fp_model = fp_model.eval()
        for p in fp_model.parameters():
            p.requires_grad_(False)
        device = next(model.parameters()).device
        self.gamma = nn.Parameter(torch.ones(len(self.stages), device=device))
        self.batch_size = batch_size
        self._records = {}

    def parameters(self):
        return [self.gamma]

    def state_dict(self):
        return {"gamma": self.gamma.detach().cpu()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.gamma.copy_(state["gamma"])

    def _hooks(self, model, stages, sink):
        hooks = [model.register_forward_pre_hook(lambda m, args: sink(args[0].device, "input", args[0]))]
        for i, stage in enumerate(stages):
            hooks.append(stage.register_forward_hook(
                lambda m, args, out, i=i: sink(out.device, i, out)))
        return hooks

    def _sink(self, device, key, value):
        self._records.setdefault(device, {})[key] = value

    @contextlib.contextmanager
    def record(self):
        """Capture the binary network's input and stage outputs during the block."""
        self._records = {}
        hooks = self._hooks(self.model, self.stages, self._sink)
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()

    def fp_features(self, x):
        """ReLU'd stage outputs of the frozen FP network on ``x`` (no gradient, eval mode)."""
        feats = {}
        hooks = [s.register_forward_hook(lambda m, a, out, i=i: feats.__setitem__(i, out))
                 for i, s in enumerate(self.fp_stages)]
        try:
            self.fp_model.eval()
            with torch.no_grad():
                self.fp_model(x)
        finally:
            for h in hooks:
                h.remove()
        # in place: the stage outputs are ours alone and need no gradient
        return [F.relu_(feats[i].float()) for i in range(len(self.fp_stages))]

    def loss(self):
        """``(loss, logs)``: ``sum_i MSE(est_B_i, est_F_i) / 2**(S-1-i) / (batch_size * 10000)`` of the
        last forward pass, and no per-layer logs (this form has no sigma ratios)."""
        if not self._records:
            raise RuntimeError("OfficialLCR.loss() needs a forward pass inside record()")
        devices = sorted(self._records, key=lambda d: (d.type, d.index or 0))
        out = devices[0]
        n = len(self.stages)
        with fp32_math():
            feats_b = [_gather([F.hardtanh(self._records[d][i].float()) for d in devices], out) for i in range(n)]
            x = _gather([self._records[d]["input"] for d in devices], out)
            feats_f = self.fp_features(x)
            loss = official_loss(feats_b, feats_f, self.gamma.to(out)) / (self.batch_size * OFFICIAL_DIVISOR)
        self._records = {}
        return loss, {}
