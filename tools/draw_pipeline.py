"""Draw the LCR-BNN method figure (``pipeline.jpg``) with matplotlib only.

The figure has three panels, read left to right:

1. One binary layer ``k`` of an IR-Net style network: the real activation ``A_F^{k-1}`` is
   binarised by Sign (error-decay-estimator backward), convolved with 1-bit power-of-two scaled
   weights, batch-normalised, added to the shortcut and clipped by hardtanh into ``A_F^k``, whose
   sign ``A_B^k`` feeds the next layer.
2. The retention matrices ``RM_F^k = X_F Y_F^T / N`` (real activations) and ``RM_B^k = X_B Y_B^T / N``
   (their signs), one ``C1 x C2`` matrix per sample.
3. Power iteration for the largest singular value, the LCR loss
   ``mean_k mean_batch (sigma(RM_B^k) / sg[sigma(RM_F^k)] - 1)^2`` and the total loss
   ``CE + alpha * c * L_LCR`` (``alpha = 0`` is plain IR-Net).

Everything is drawn from patches, arrows and (mathtext) text; no external images are used.

Usage::

    python -m tools.draw_pipeline                      # writes pipeline.jpg at the project root
    python -m tools.draw_pipeline --out fig.jpg --dpi 150

The JPEG carries a comment naming this tool; it replaces an existing file only when that file
carries it too (or with ``--force``).
"""
if __package__ in (None, ""):  # run as a file: the imports below need the repository root on the path
    import sys
    sys.exit("run the tools from the repository root as modules: python -m tools.draw_pipeline "
             + " ".join(sys.argv[1:]))

import argparse
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

from utils.outputs import OutputError, check_output  # noqa: E402

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(PROJECT_ROOT, "pipeline.jpg")
TAG = "lcr-bnn-draw-pipeline"

# Figure geometry: data units are inches, so at the default 100 dpi one unit is 100 px.
FIG_W, FIG_H = 16.0, 9.0
DEFAULT_DPI = 100
JPEG_QUALITY = 92

# Palette: real-valued tensors blue, binary tensors orange, operations grey, losses purple.
REAL_EDGE, REAL_FILL, REAL_TEXT = "#2F6DB5", "#DCE9F8", "#1D4E89"
BIN_EDGE, BIN_FILL, BIN_TEXT = "#D9711C", "#FCE3CC", "#9A4A0B"
OP_EDGE, OP_FILL = "#6B7280", "#F1F2F4"
LOSS_EDGE, LOSS_FILL, LOSS_TEXT = "#6A4C93", "#ECE4F5", "#4B2E73"
NOTE_EDGE, NOTE_FILL = "#C9CDD3", "#FFFFFF"
PANEL_FILL, PANEL_EDGE = "#F8F9FB", "#D5D9E0"
INK, MUTED = "#222222", "#555B66"

FS_TITLE, FS_HEAD, FS_BOX, FS_NOTE, FS_SMALL = 17, 13, 11.5, 10.5, 9.5


def box(ax, cx, cy, w, h, text, edge, fill, color=INK, fs=FS_BOX, lw=1.4, rounding=0.08, **kw):
    """A rounded box centred at (cx, cy) with centred text; returns its (left, right, bottom, top)."""
    ax.add_patch(FancyBboxPatch((cx - w / 2, cy - h / 2), w, h,
                                boxstyle=f"round,pad=0,rounding_size={rounding}",
                                linewidth=lw, edgecolor=edge, facecolor=fill, zorder=3, **kw))
    if text:
        ax.text(cx, cy, text, ha="center", va="center", fontsize=fs, color=color, zorder=4)
    return cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2


def arrow(ax, start, end, color=INK, lw=1.5, style="-|>", ls="-", ms=13, connection="arc3", z=2):
    """A straight (or curved, via ``connection``) arrow from ``start`` to ``end``."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=ms, color=color,
                                 linewidth=lw, linestyle=ls, connectionstyle=connection,
                                 shrinkA=0, shrinkB=0, zorder=z))


def panel(ax, x0, x1, y0, y1, number, title):
    """A light background panel with a numbered header."""
    ax.add_patch(FancyBboxPatch((x0, y0), x1 - x0, y1 - y0,
                                boxstyle="round,pad=0,rounding_size=0.15", linewidth=1.2,
                                edgecolor=PANEL_EDGE, facecolor=PANEL_FILL, zorder=0))
    ax.add_patch(Circle((x0 + 0.3, y1 - 0.3), 0.17, facecolor=INK, edgecolor="none", zorder=4))
    ax.text(x0 + 0.3, y1 - 0.3, str(number), ha="center", va="center", fontsize=11, color="white",
            fontweight="bold", zorder=5)
    ax.text(x0 + 0.58, y1 - 0.3, title, ha="left", va="center", fontsize=FS_HEAD, color=INK,
            fontweight="bold", zorder=4)


def note(ax, x0, y0, w, h, lines, title=None, edge=NOTE_EDGE, fill=NOTE_FILL, fs=FS_NOTE,
         title_color=INK):
    """A white annotation card with an optional bold title and left-aligned lines spread evenly."""
    ax.add_patch(FancyBboxPatch((x0, y0), w, h, boxstyle="round,pad=0,rounding_size=0.06",
                                linewidth=1.0, edgecolor=edge, facecolor=fill, zorder=3))
    rows = ([(title, True)] if title else []) + [(line, False) for line in lines]
    step = h / (len(rows) + 0.6)
    for i, (text, bold) in enumerate(rows):
        ax.text(x0 + 0.12, y0 + h - step * (i + 0.8), text, ha="left", va="center",
                fontsize=fs + (0.5 if bold else 0), color=title_color if bold else INK,
                fontweight="bold" if bold else "normal", zorder=4)


def grid(ax, x0, ytop, rows, cols, cell, colors, edge):
    """A matrix icon of ``rows x cols`` cells, top-left corner at (x0, ytop)."""
    for r in range(rows):
        for c in range(cols):
            ax.add_patch(Rectangle((x0 + c * cell, ytop - (r + 1) * cell), cell, cell,
                                   facecolor=colors[r][c], edgecolor="white", linewidth=0.8, zorder=3))
    ax.add_patch(Rectangle((x0, ytop - rows * cell), cols * cell, rows * cell, facecolor="none",
                           edgecolor=edge, linewidth=1.3, zorder=4))
    return x0, x0 + cols * cell, ytop - rows * cell, ytop


def shades(values, lo_hex, hi_hex):
    """Map values in [0, 1] linearly between two hex colours."""
    lo = np.array(matplotlib.colors.to_rgb(lo_hex))
    hi = np.array(matplotlib.colors.to_rgb(hi_hex))
    return [[tuple(lo + (hi - lo) * v) for v in row] for row in values]


# --------------------------------------------------------------------------------------------------
# Panel 1: one binary layer
# --------------------------------------------------------------------------------------------------
def draw_layer_panel(ax):
    panel(ax, 0.2, 6.55, 0.75, 8.25, 1, "Binary layer $k$  (IR-Net, 1W1A)")
    cx, w, h = 1.95, 2.2, 0.44
    ys = np.linspace(7.3, 1.15, 10)
    items = [
        (r"real  $A_F^{k-1}$", "real"),
        (r"$\mathrm{Sign}$", "op"),
        (r"binary  $A_B^{k-1}\in\{\pm 1\}$", "bin"),
        (r"1-bit conv", "op"),
        (r"BN", "op"),
        (None, "add"),
        (r"hardtanh", "op"),
        (r"real  $A_F^{k}$", "real"),
        (r"$\mathrm{Sign}$", "op"),
        (r"binary  $A_B^{k}\in\{\pm 1\}$", "bin"),
    ]
    style = {"real": (REAL_EDGE, REAL_FILL, REAL_TEXT), "bin": (BIN_EDGE, BIN_FILL, BIN_TEXT),
             "op": (OP_EDGE, OP_FILL, INK)}
    r_add = 0.17
    for i, ((text, kind), y) in enumerate(zip(items, ys)):
        if kind == "add":
            ax.add_patch(Circle((cx, y), r_add, facecolor="white", edgecolor=INK, linewidth=1.4,
                                zorder=3))
            ax.text(cx, y + 0.01, "+", ha="center", va="center", fontsize=14, color=INK, zorder=4)
        else:
            edge, fill, color = style[kind]
            bw = w if kind != "op" else 1.6
            box(ax, cx, y, bw, h, text, edge, fill, color=color, lw=1.8 if kind != "op" else 1.2)
        if i:
            top = ys[i - 1] - (r_add if items[i - 1][1] == "add" else h / 2)
            bot = y + (r_add if kind == "add" else h / 2)
            arrow(ax, (cx, top), (cx, bot))

    # Shortcut from A_F^{k-1} around the conv to the add.
    xs = 0.5
    ax.plot([cx - w / 2, xs, xs], [ys[0], ys[0], ys[5]], color=INK, lw=1.5, zorder=2,
            solid_joinstyle="round")
    arrow(ax, (xs, ys[5]), (cx - r_add, ys[5]))
    ax.text(xs - 0.1, (ys[0] + ys[5]) / 2, "shortcut (Bi-Real)", rotation=90, ha="center", va="center",
            fontsize=FS_SMALL, color=MUTED, zorder=4,
            bbox=dict(boxstyle="square,pad=0.15", facecolor=PANEL_FILL, edgecolor="none"))
    # The next layer consumes A_B^k.
    ax.text(cx + w / 2 + 0.12, ys[9], r"$\rightarrow$ layer $k{+}1$", ha="left", va="center",
            fontsize=FS_SMALL, color=MUTED)

    # Side notes (x range right of the chain).
    nx, nw = 3.3, 3.1
    dotted = dict(color=NOTE_EDGE, lw=1.0, ls=(0, (2, 2)), zorder=1)
    note(ax, nx, 5.95, nw, 1.4, [
        r"fwd: $y=\mathrm{sign}(x)$,  $\mathrm{sign}(0)=+1$",
        r"bwd: $\partial_x\mathcal{L}=\partial_y\mathcal{L}\cdot k\,t\,(1-\tanh^2(t\,x))$",
        r"$t=T_{\min}(T_{\max}/T_{\min})^{e/E},\ \ k=\max(1/t,\,1)$",
    ], title="Sign with EDE backward")
    ax.plot([cx + 0.8, nx], [ys[1], ys[1]], **dotted)

    note(ax, nx, 4.2, nw, 1.45, [
        r"$\hat w=(W_o-\mathrm{mean}\,W_o)\,/\,\mathrm{std}\,W_o$",
        r"$b_w=\mathrm{sign}(\hat w)\cdot 2^{\,\mathrm{round}(\log_2 \mathrm{mean}|\hat w|)}$",
        r"$y=\mathrm{conv}(A_B^{k-1},\,b_w)$  (XNOR + popcount)",
    ], title="1-bit conv weights, per filter $o$")
    ax.plot([cx + 0.8, nx], [ys[3], ys[3]], **dotted)

    ax.text(nx + 0.05, ys[5], r"add shortcut: $\mathrm{BN}(y)+A_F^{k-1}$", ha="left", va="center",
            fontsize=FS_SMALL, color=MUTED)
    ax.plot([cx + r_add, nx - 0.02], [ys[5], ys[5]], **dotted)
    ax.text(nx + 0.05, ys[6], r"clip to $[-1,1]$", ha="left", va="center", fontsize=FS_SMALL, color=MUTED)
    ax.plot([cx + 0.8, nx - 0.02], [ys[6], ys[6]], **dotted)

    # Recording taps, sent to panel 2 (the inter-panel arrow leaves this card).
    yc = (ys[7] + ys[9]) / 2
    note(ax, nx, yc - 0.42, nw, 0.84, [
        r"$A_F^{k-1},\,A_F^{k}$ and their signs $A_B^{k-1},\,A_B^{k}$",
    ], title="recorded in the same forward pass", fs=FS_SMALL)
    for y, sgn in ((ys[7], 1), (ys[9], -1)):
        ax.plot([cx + w / 2, nx - 0.02], [y - sgn * 0.12, yc + sgn * 0.2], **dotted)
    return ys


# --------------------------------------------------------------------------------------------------
# Panel 2: retention matrices
# --------------------------------------------------------------------------------------------------
def draw_rm_row(ax, y_top, kind, rng, xc):
    """One matrix-product picture X (C1 x N) . Y^T (N x C2) / N = RM (C1 x C2)."""
    c1, c2, n, cell = 4, 5, 5, 0.16
    if kind == "real":
        edge, text_c, lo, hi = REAL_EDGE, REAL_TEXT, "#EAF2FC", "#2F6DB5"
        xv = rng.random((c1, n))
        yv = rng.random((n, c2))
        sub = "F"
    else:
        edge, text_c, lo, hi = BIN_EDGE, BIN_TEXT, "#FDEBDC", "#D9711C"
        xv = (rng.random((c1, n)) > 0.5).astype(float) * 0.85 + 0.05
        yv = (rng.random((n, c2)) > 0.5).astype(float) * 0.85 + 0.05
        sub = "B"
    rmv = rng.random((c1, c2)) * 0.8 + 0.1

    # Widths: C1 label, X, product dot, Y^T, "/N =", RM, C1 label; centred on xc.
    gap_dot, gap_eq = 0.3, 0.95
    total = n * cell + gap_dot + c2 * cell + gap_eq + c2 * cell
    x0 = xc - total / 2
    xl, xr, xb, xt = grid(ax, x0, y_top, c1, n, cell, shades(xv, lo, hi), edge)
    ax.text((xl + xr) / 2, xt + 0.1, r"$N$", ha="center", va="bottom", fontsize=FS_SMALL, color=MUTED)
    ax.text(xl - 0.07, (xb + xt) / 2, r"$C_1$", ha="right", va="center", fontsize=FS_SMALL, color=MUTED)
    ax.text((xl + xr) / 2, xb - 0.08, rf"$X_{sub}$", ha="center", va="top", fontsize=FS_BOX, color=text_c)

    ax.text(xr + gap_dot / 2, y_top - c1 * cell / 2, r"$\cdot$", ha="center", va="center", fontsize=18,
            color=INK)

    y0 = xr + gap_dot
    yl, yr, yb, yt = grid(ax, y0, y_top, n, c2, cell, shades(yv, lo, hi), edge)
    ax.text((yl + yr) / 2, yt + 0.1, r"$C_2$", ha="center", va="bottom", fontsize=FS_SMALL, color=MUTED)
    ax.text(yr + 0.06, (yb + yt) / 2, r"$N$", ha="left", va="center", fontsize=FS_SMALL, color=MUTED)
    ax.text((yl + yr) / 2, yb - 0.08, rf"$Y_{sub}^{{\top}}$", ha="center", va="top", fontsize=FS_BOX,
            color=text_c)

    ax.text(yr + 0.2 + (gap_eq - 0.2) / 2, y_top - c1 * cell / 2, r"$/\,N\; =$", ha="center", va="center",
            fontsize=FS_BOX, color=INK)

    r0 = yr + gap_eq
    rl, rr, rb, rt = grid(ax, r0, y_top, c1, c2, cell, shades(rmv, "#F3EEF9", "#7E5BA8"), LOSS_EDGE)
    ax.text((rl + rr) / 2, rt + 0.1, r"$C_2$", ha="center", va="bottom", fontsize=FS_SMALL, color=MUTED)
    ax.text(rr + 0.06, (rb + rt) / 2, r"$C_1$", ha="left", va="center", fontsize=FS_SMALL, color=MUTED)
    ax.text((rl + rr) / 2, rb - 0.08, rf"$RM_{sub}^{{k}}$", ha="center", va="top", fontsize=FS_BOX,
            color=LOSS_TEXT)


def draw_rm_panel(ax, rng):
    x0, x1 = 6.75, 10.95
    panel(ax, x0, x1, 0.75, 8.25, 2, "Retention matrices (per sample)")
    note(ax, x0 + 0.15, 6.55, x1 - x0 - 0.3, 1.0, [
        r"$X=A^{k-1}\!:\,C_1{\times}H_1{\times}W_1,\quad Y=A^{k}\!:\,C_2{\times}H_2{\times}W_2$",
        r"if $H_1>H_2$: average-pool $X$ to $H_2{\times}W_2$; flatten, $N=H_2W_2$",
    ], fs=FS_SMALL)

    # Real row.
    ax.text(x0 + 0.2, 6.2, "real activations", ha="left", va="center", fontsize=FS_NOTE,
            color=REAL_TEXT, fontweight="bold")
    ax.text(x1 - 0.2, 6.2, r"$X_F=A_F^{k-1},\ Y_F=A_F^{k}$", ha="right", va="center", fontsize=FS_NOTE,
            color=REAL_TEXT)
    draw_rm_row(ax, 5.7, "real", rng, (x0 + x1) / 2)
    # Binary row.
    ax.text(x0 + 0.2, 3.85, "binary activations", ha="left", va="center", fontsize=FS_NOTE,
            color=BIN_TEXT, fontweight="bold")
    ax.text(x1 - 0.2, 3.85, r"$X_B=A_B^{k-1},\ Y_B=A_B^{k}$", ha="right", va="center", fontsize=FS_NOTE,
            color=BIN_TEXT)
    draw_rm_row(ax, 3.35, "bin", rng, (x0 + x1) / 2)

    box(ax, (x0 + x1) / 2, 1.55, x1 - x0 - 0.3, 0.95, None, LOSS_EDGE, LOSS_FILL, lw=1.2)
    ax.text((x0 + x1) / 2, 1.78,
            r"$RM_F^k=\frac{1}{N}X_F\,Y_F^{\top},\qquad RM_B^k=\frac{1}{N}X_B\,Y_B^{\top}$",
            ha="center", va="center", fontsize=FS_BOX, color=LOSS_TEXT, zorder=4)
    ax.text((x0 + x1) / 2, 1.3, r"one $C_1{\times}C_2$ matrix per sample, for every layer $k=1..K$",
            ha="center", va="center", fontsize=FS_SMALL, color=MUTED, zorder=4)


# --------------------------------------------------------------------------------------------------
# Panel 3: singular values and loss
# --------------------------------------------------------------------------------------------------
def draw_loss_panel(ax):
    x0, x1 = 11.15, 15.8
    xc = (x0 + x1) / 2
    panel(ax, x0, x1, 0.75, 8.25, 3, r"Lipschitz estimate and loss")

    note(ax, x0 + 0.15, 5.55, x1 - x0 - 0.3, 2.0, [
        r"repeat (5 iterations, fp32):",
        r"$\quad v \leftarrow RM^{\top}u\,/\,\Vert RM^{\top}u\Vert,"
        r"\quad u \leftarrow RM\,v\,/\,\Vert RM\,v\Vert$",
        r"$\sigma(RM)=u^{\top}RM\,v$  = largest singular value",
        r"$u, v$ detached $\Rightarrow\ \partial\sigma/\partial RM = u\,v^{\top}$",
    ], title="Power iteration", edge=LOSS_EDGE)

    # sigma pills.
    yp = 4.75
    xf, xb = x0 + 1.2, x1 - 1.2
    box(ax, xf, yp, 1.95, 0.5, r"$\sigma(RM_F^k)$", REAL_EDGE, REAL_FILL, color=REAL_TEXT, lw=1.8)
    box(ax, xb, yp, 1.95, 0.5, r"$\sigma(RM_B^k)$", BIN_EDGE, BIN_FILL, color=BIN_TEXT, lw=1.8)
    ax.text(xf, yp - 0.38, "detached (stop-grad)", ha="center", va="top", fontsize=FS_SMALL, color=MUTED)
    ax.text(xb, yp - 0.38, "gradient flows back", ha="center", va="top", fontsize=FS_SMALL, color=MUTED)
    arrow(ax, (xf, 5.55), (xf, yp + 0.25))
    arrow(ax, (xb, 5.55), (xb, yp + 0.25))

    # LCR loss.
    yl = 3.3
    box(ax, xc, yl, x1 - x0 - 0.3, 0.95, None, LOSS_EDGE, LOSS_FILL, lw=1.6)
    ax.text(xc, yl + 0.02,
            r"$\mathcal{L}_{\mathrm{LCR}}=\mathrm{mean}_k\,\mathrm{mean}_{\mathrm{batch}}"
            r"\left(\dfrac{\sigma(RM_B^k)}{\mathrm{sg}[\sigma(RM_F^k)]}-1\right)^{2}$",
            ha="center", va="center", fontsize=FS_BOX + 2, color=LOSS_TEXT, zorder=4)
    arrow(ax, (xf, yp - 0.62), (xf, yl + 0.475), ls=(0, (4, 3)))
    arrow(ax, (xb, yp - 0.62), (xb, yl + 0.475))

    # Total loss.
    yt = 1.85
    box(ax, xc, yt, x1 - x0 - 0.3, 0.62, None, LOSS_EDGE, "#DCCFEE", lw=2.0)
    ax.text(xc, yt, r"$\mathcal{L}=\mathcal{L}_{\mathrm{CE}}+\alpha\,c\,\mathcal{L}_{\mathrm{LCR}}$",
            ha="center", va="center", fontsize=FS_BOX + 2, color=LOSS_TEXT, zorder=4)
    arrow(ax, (xc, yl - 0.475), (xc, yt + 0.31))
    ax.text(xc, 1.3,
            r"$\mathcal{L}_{\mathrm{CE}}$ on the logits of the same pass; "
            r"$c$: fixed scale, $\alpha$: LCR weight",
            ha="center", va="center", fontsize=FS_SMALL, color=MUTED)
    ax.text(xc, 1.0, r"$\alpha=0$: plain IR-Net (no recording, identical loss)",
            ha="center", va="center", fontsize=FS_SMALL, color=MUTED)


def draw_legend(ax, fig):
    """One row of legend entries under the panels, spaced by measured text widths."""
    y = 0.38
    entries = [
        ("patch", REAL_EDGE, REAL_FILL, "real-valued tensor"),
        ("patch", BIN_EDGE, BIN_FILL, r"binary tensor ($\pm 1$)"),
        ("patch", OP_EDGE, OP_FILL, "operation"),
        ("patch", LOSS_EDGE, LOSS_FILL, "retention matrix / loss"),
        ("line", INK, "-", "forward"),
        ("line", INK, (0, (4, 3)), "no gradient (stop-grad, sg)"),
    ]
    renderer = fig.canvas.get_renderer()
    to_data = ax.transData.inverted()
    x = 0.6
    for kind, edge, fill, label in entries:
        if kind == "patch":
            ax.add_patch(FancyBboxPatch((x, y - 0.11), 0.38, 0.22,
                                        boxstyle="round,pad=0,rounding_size=0.04",
                                        edgecolor=edge, facecolor=fill, linewidth=1.4, zorder=3))
        else:
            arrow(ax, (x, y), (x + 0.38, y), color=edge, ls=fill, ms=10, lw=1.4)
        t = ax.text(x + 0.5, y, label, ha="left", va="center", fontsize=FS_NOTE, color=INK)
        bbox = t.get_window_extent(renderer=renderer)
        right = to_data.transform((bbox.x1, bbox.y1))[0]
        x = right + 0.6


def draw(dpi=DEFAULT_DPI):
    """Build the figure and return it (not saved)."""
    fig = plt.figure(figsize=(FIG_W, FIG_H), dpi=dpi, facecolor="white")
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, FIG_W)
    ax.set_ylim(0, FIG_H)
    ax.set_aspect("equal")
    ax.axis("off")

    ax.text(FIG_W / 2, 8.68, "LCR-BNN: Lipschitz Continuity Retained Binary Neural Network",
            ha="center", va="center", fontsize=FS_TITLE, fontweight="bold", color=INK)
    ax.text(15.8, 8.68, "Shang et al., ECCV 2022", ha="right", va="center", fontsize=FS_NOTE,
            color=MUTED, style="italic")

    rng = np.random.default_rng(7)
    ys = draw_layer_panel(ax)
    draw_rm_panel(ax, rng)
    draw_loss_panel(ax)
    draw_legend(ax, fig)

    # Inter-panel arrows: 1 -> 2 beside the "recorded" note; 2 -> 3 into the power-iteration card.
    yc = (ys[7] + ys[9]) / 2
    for xa, xb_, y in [(6.4, 6.75, yc), (10.95, 11.15, 6.1)]:
        arrow(ax, (xa, y), (xb_ + 0.1, y), lw=2.5, ms=18, z=6)
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output JPEG path (default: %(default)s)")
    parser.add_argument("--dpi", type=float, default=DEFAULT_DPI,
                        help="resolution; the figure is 16x9 inches (default: %(default)s -> 1600x900 px)")
    parser.add_argument("--force", action="store_true", help="replace an --out that this tool did not write")
    if argv is not None:
        argv = [os.fspath(a) for a in argv]  # allow pathlib.Path arguments
    args = parser.parse_args(argv)

    out = args.out
    try:
        check_output(out, TAG, force=args.force)
    except OutputError as exc:
        parser.exit(1, f"error: {exc}\n")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig = draw(dpi=args.dpi)
    fig.savefig(out, dpi=args.dpi, format="jpeg", facecolor="white",
                pil_kwargs={"quality": JPEG_QUALITY, "optimize": True, "comment": TAG})
    plt.close(fig)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
