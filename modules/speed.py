"""The one switch for this project's measured speed tricks.

A speed trick lives in one named helper whose docstring gives the measurement that justifies it,
and the plain formula stays beside it. Each trick has a name:

- ``sign``: :func:`modules.binary.two_valued_sign`, ``sign(sign(x) + 0.5)`` for ``where(x >= 0, 1, -1)``;
- ``pool``: :func:`modules.lcr.pool_to`, average pooling as a sum of slices;
- ``group``: :func:`modules.lcr.top_singular_of_pairs`, retention matrices of one shape formed into
  one buffer and solved in one call;
- ``chunks``: :func:`modules.singular.block_power_iteration`, cache-sized chunks on the CPU;
- ``slope``: :func:`modules.lcr.times_tanh_slope_`, ``1 - tanh(x)^2`` through ``sigmoid(2x)``.

Inside :func:`plain_formulas` the named helpers (all of them by default) take the plain path:
``python -m tools.bench --plain NAME`` times both paths in one paired run, and the tests check that
both give the same numbers.
"""
import contextlib

TRICKS = ("sign", "pool", "group", "chunks", "slope")
_plain = set()


def enabled(name):
    """Whether the speed trick ``name`` is on (it is, outside :func:`plain_formulas`)."""
    return name not in _plain


@contextlib.contextmanager
def plain_formulas(*names):
    """Within the block, the named speed helpers (every one when none is named) compute their plain
    reference formula instead."""
    unknown = set(names) - set(TRICKS)
    if unknown:
        raise ValueError(f"unknown speed trick {sorted(unknown)}; choose from {', '.join(TRICKS)}")
    before = set(_plain)
    _plain.update(names or TRICKS)
    try:
        yield
    finally:
        _plain.clear()
        _plain.update(before)
