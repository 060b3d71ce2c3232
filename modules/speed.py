"""The one switch for this project's measured speed tricks.

A speed trick lives in one named helper whose docstring gives the measurement that justifies it,
and the plain formula stays beside it. Inside :func:`plain_formulas` every helper takes the plain
path: ``python -m tools.bench --plain`` times both paths in one paired run, and the tests check
that both give the same numbers.
"""
import contextlib

_fast = True


def enabled():
    """Whether the speed tricks are on (they are, outside :func:`plain_formulas`)."""
    return _fast


@contextlib.contextmanager
def plain_formulas():
    """Within the block, every speed helper computes its plain reference formula instead."""
    global _fast
    before, _fast = _fast, False
    try:
        yield
    finally:
        _fast = before
