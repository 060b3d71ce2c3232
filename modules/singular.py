"""The largest singular value of many small matrices at once, with its singular vectors.

:func:`top_singular` returns ``(sigma, u, v)`` for each matrix ``A`` (C1 x C2) of a batch:
``sigma = u^T A v`` is the largest singular value and ``u``, ``v`` the unit singular vectors, so
``d sigma / d A = u v^T``. It is block power iteration with a Rayleigh-Ritz step (Golub and Van
Loan, *Matrix Computations*, sections 8.2.4 and 8.3): a block of ``p`` vectors instead of one,
iterated ``k`` times, the answer read off the best vector of the block's span::

    U_0 = fixed start rows (p x C1): the all-ones vector and cosines of rising frequency
    V_i = rows of U_{i-1} A, each normalised;   U_i = V_i A^T             (i = 1 .. k)
    Rayleigh-Ritz on span(V_k):  T y = lambda M y  with  T = U_k U_k^T,  M = V_k V_k^T   (p x p)
    v = V_k^T y / |.|,   sigma = |A v|,   u = A v / sigma

The top Ritz vector converges like ``(sigma_{p+1} / sigma_1) ** (2 k)`` where single-vector power
iteration converges like ``(sigma_2 / sigma_1) ** (2 k)``: retention matrices of binary networks
often have ``sigma_2 / sigma_1`` above 0.95 (up to 0.998) but a clear gap further down, so a block
of 4 reaches in 5 steps what one vector does not reach in 40 (docs/RESULTS.md, "The spectral norm";
``python -m tools.lcr_power_error``). The rows of the block are only normalised, never
orthogonalised (they all drift towards the top vector); the p x p problem is solved in float64
with a small ridge, which keeps it well posed when the block has collapsed.

No random numbers are drawn (the training RNG streams stay untouched) and no gradient is recorded.
"""
import math

import torch

from modules import speed

__all__ = ["default_block_and_steps", "top_singular"]

# (p, k) by the smaller side of the matrices: up to 64 (all of CIFAR ResNet-20) a block of 4 for
# 6 steps; wider matrices (ImageNet ResNet-18's 128-512 channel stages) have more singular values
# close to the top and take a block of 8 for 8 steps. Both meet median |sigma error| < 0.1 % and
# a gradient cosine >= 0.99 against the exact SVD on recorded matrices (docs/RESULTS.md).
NARROW, NARROW_BLOCK_STEPS, WIDE_BLOCK_STEPS = 64, (4, 6), (8, 8)
RIDGE = 1e-5            # relative to the largest diagonal entry of M: keeps directions that rounding erased harmless


def default_block_and_steps(c1, c2):
    """``(p, k)`` for C1 x C2 matrices (see NARROW above)."""
    return NARROW_BLOCK_STEPS if min(c1, c2) <= NARROW else WIDE_BLOCK_STEPS


def start_block(c, p, device=None):
    """``p`` orthonormal rows of length ``c``: the all-ones vector and cosines of rising frequency."""
    i = torch.arange(c, dtype=torch.float64, device=device)
    rows = [torch.cos(math.pi * j * (i + 0.5) / c) for j in range(p)]
    block = torch.stack(rows)
    return (block / block.norm(dim=1, keepdim=True)).float()


def _normalise_rows(x):
    return torch.nn.functional.normalize(x, dim=-1, eps=1e-30)


def top_singular(a, steps=None, block=None):
    """``(sigma, u, v)`` of each matrix of ``a`` (B x C1 x C2): B values, B x C1 and B x C2 unit vectors.

    Block power iteration with ``block`` vectors and ``steps`` steps (defaults by size:
    :func:`default_block_and_steps`), then Rayleigh-Ritz (module docstring). fp32 products, the
    p x p solve in float64; no gradient.
    """
    with torch.no_grad():
        a = a.float()
        b, c1, c2 = a.shape
        default_p, default_k = default_block_and_steps(c1, c2)
        p = max(1, min(block or default_p, c1, c2))
        v, u = block_power_iteration(a, start_block(c1, p, a.device), steps or default_k)
        y = _top_ritz_coefficients(torch.bmm(u, u.transpose(1, 2)), torch.bmm(v, v.transpose(1, 2)))
        v = (y.unsqueeze(2) * v).sum(1)                  # V^T y
        av = (y.unsqueeze(2) * u).sum(1)                 # A V^T y
        v_norm = v.norm(dim=1).clamp_min(1e-30)
        av_norm = av.norm(dim=1)
        sigma = av_norm / v_norm
        u = av / av_norm.clamp_min(1e-30)[:, None]
        return sigma, u, v / v_norm[:, None]


# On the CPU the block steps run on chunks of about this many bytes of matrices, so that the 2 k
# passes over a chunk come from the cache instead of main memory.
CPU_CHUNK_BYTES = 2 << 20


def block_power_iteration(a, start, steps):
    """``(V, U)`` after ``steps`` block steps from the rows ``start`` (p x C1): ``V_i`` = normalised rows
    of ``U_{i-1} A``, ``U_i = V_i A^T`` (module docstring).

    Speed trick: on the CPU the matrices are taken in cache-sized chunks (``python -m
    tools.bench_tricks``, ResNet-20 at batch 128, one thread: 101 against 125 ms for forming and solving
    one step's retention matrices; docs/RESULTS.md section 5).
    """
    b, c1, c2 = a.shape
    per = b
    if speed.enabled("chunks") and a.device.type == "cpu":
        per = max(1, CPU_CHUNK_BYTES // (4 * c1 * c2))
    vs, us = [], []
    for chunk in a.split(per):
        u = start.expand(chunk.shape[0], *start.shape)
        chunk_t = chunk.transpose(1, 2)
        for _ in range(steps):
            v = _normalise_rows(torch.bmm(u, chunk))     # rows v^T = u^T A
            u = torch.bmm(v, chunk_t)                    # rows u^T = v^T A^T, i.e. (A v)^T
        vs.append(v)
        us.append(u)
    return (vs[0], us[0]) if len(vs) == 1 else (torch.cat(vs), torch.cat(us))


def _top_ritz_coefficients(t, m, squarings=10):
    """``y`` (B x p) of the largest generalised eigenvalue of ``T y = lambda M y`` (both B x p x p, PSD).

    ``y`` is the top eigenvector of ``K = (M + ridge)^-1 T`` (solved in float64), found by squaring
    ``K`` repeatedly (each squaring doubles the power: after 10, eigenvalues that differ by 1 % are
    separated by a factor 3e-5) and taking the largest column of the result (it has rank one), times
    ``K`` once more.
    """
    p = m.shape[-1]
    m, t = m.double(), t.double()
    ridge = RIDGE * m.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(1e-300)
    k = torch.linalg.solve(m + ridge[:, None, None] * torch.eye(p, dtype=m.dtype, device=m.device), t).float()
    power = k
    for i in range(squarings):
        if i % 2 == 0:      # trace at most 1 before every second squaring: no overflow in between
            power = power / power.diagonal(dim1=1, dim2=2).sum(-1).abs().clamp_min(1e-30)[:, None, None]
        power = torch.bmm(power, power)
    column = power.norm(dim=1).argmax(dim=1)
    y = torch.gather(power, 2, column.view(-1, 1, 1).expand(-1, p, 1))
    # unit length: K scales like sigma^2, and A V^T y must stay far from float32's range for large sigma
    return _normalise_rows(torch.bmm(k, y).squeeze(2))
