"""The method figure tool writes a valid, non-blank ~1600x900 JPEG, and only over its own figure."""
import os

import numpy as np
import pytest
from PIL import Image

from tools import draw_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_draw_pipeline_writes_jpeg(tmp_path):
    out = tmp_path / "p.jpg"
    draw_pipeline.main(["--out", out])

    assert out.is_file()
    with Image.open(out) as im:
        assert im.format == "JPEG"
        width, height = im.size
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert 1400 <= width <= 1800 and 780 <= height <= 1020, (width, height)
    assert abs(width / height - 16 / 9) < 0.05
    # A blank (or nearly blank) canvas has a tiny spread; the drawn figure has text, boxes and arrows.
    assert pixels.std() > 15.0, pixels.std()
    # Something dark (text, arrows) and a white background are both present.
    assert pixels.min() < 60 and pixels.max() > 240
    draw_pipeline.main(["--out", out])                      # its own figure: replaced


def test_default_out_is_the_committed_figure_and_foreign_files_are_kept(tmp_path):
    assert os.path.abspath(draw_pipeline.DEFAULT_OUT) == os.path.join(ROOT, "pipeline.jpg")
    foreign = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(foreign)
    before = foreign.read_bytes()
    with pytest.raises(SystemExit):
        draw_pipeline.main(["--out", foreign])
    assert foreign.read_bytes() == before
