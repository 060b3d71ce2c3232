"""The method figure script writes a valid, non-blank ~1600x900 JPEG."""
import importlib.util
import os

import numpy as np
from PIL import Image

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                      "draw_pipeline.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("draw_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_draw_pipeline_writes_jpeg(tmp_path):
    out = tmp_path / "p.jpg"
    _load_script().main(["--out", out])

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


def test_default_out_is_project_root():
    module = _load_script()
    root = os.path.dirname(os.path.dirname(SCRIPT))
    assert os.path.abspath(module.DEFAULT_OUT) == os.path.join(root, "pipeline.jpg")
