"""Train or evaluate an LCR-BNN on ImageNet (or the synthetic `fake` set).

    cd imagenet && python main.py --save='v0' --data_path='path-to-imagenet' --gpus='0' --batch_size=128 --alpha=8
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.options import IMAGENET_DEFAULTS, parse_args  # noqa: E402

if __name__ == "__main__":
    args = parse_args(IMAGENET_DEFAULTS, "LCR-BNN training on ImageNet")
    from utils.trainer import main  # after parsing: flag errors need no torchvision import
    main(args)
