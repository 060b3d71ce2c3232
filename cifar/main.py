"""Train or evaluate an LCR-BNN on CIFAR-10/100 (or the offline `digits` and `fake` sets).

    cd cifar && python main.py --dataset cifar10 --model resnet20_1w1a --alpha 8 --gpus 0
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.options import CIFAR_DEFAULTS, parse_args  # noqa: E402

if __name__ == "__main__":
    args = parse_args(CIFAR_DEFAULTS, "LCR-BNN training on CIFAR-10/100")
    from utils.trainer import main  # after parsing: flag errors need no torchvision import
    main(args)
