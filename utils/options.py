"""Command-line flags shared by ``cifar/main.py`` and ``imagenet/main.py``.

The flag names are the released code's (``--data_path``, ``--gpus``, ``--alpha``, ``-bt``, ...), so
the commands in the paper's README work as typed. Each script passes its dataset's defaults.
"""
import argparse

import models
from modules.lcr import VARIANTS

CIFAR_DEFAULTS = dict(
    dataset="cifar10", datasets=("cifar10", "cifar100", "digits", "fake"), model="resnet20_1w1a",
    model_fp="resnet20_fp", data_path="./data", epochs=400, batch_size=256, batch_size_test=256,
    lr=0.1, weight_decay=1e-4, workers=4, fake_image_size=32,
)
IMAGENET_DEFAULTS = dict(
    dataset="imagenet", datasets=("imagenet", "fake"), model="resnet18_1w1a_IR",
    model_fp="resnet18_fp", data_path=None, epochs=100, batch_size=128, batch_size_test=128,
    lr=0.1, weight_decay=1e-4, workers=8, fake_image_size=224,
)


def _int_list(text):
    """``"30,60"`` or ``"30 60"`` -> [30, 60]."""
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def get_args_parser(defaults, description):
    """The argument parser of a training script whose dataset defaults are ``defaults``."""
    d = defaults
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("run and output")
    g.add_argument("--results_dir", default="./results", help="folder that holds run folders")
    g.add_argument("--save", default="", help="suffix of the run folder <results_dir>/<model><save>/")
    g.add_argument("--resume", nargs="?", const="auto", default="",
                   help="resume from the run folder's checkpoint.pth.tar (no value) or from FILE")
    g.add_argument("-e", "--evaluate", metavar="FILE", default="",
                   help="evaluate a checkpoint or bare state dict on the whole validation set and exit")
    g.add_argument("--seed", type=int, default=1234, help="random seed of the whole run")
    g.add_argument("-p", "--print_freq", type=int, default=100, help="print every N iterations")
    g.add_argument("--time_estimate", type=int, default=1,
                   help="1: print the estimated finish time after every epoch, 0: do not")

    g = p.add_argument_group("model")
    g.add_argument("-a", "--model", default=d["model"], choices=models.list_models(), metavar="NAME",
                   help="binary network to train; one of: " + ", ".join(models.list_models()))
    g.add_argument("--model_fp", default=d["model_fp"], choices=models.list_models(), metavar="NAME",
                   help="frozen full-precision network of the official LCR form")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d["dataset"], choices=d["datasets"], help="dataset")
    g.add_argument("--data_path", default=d["data_path"], help="dataset folder")
    g.add_argument("--download", action="store_true", help="download CIFAR into --data_path if missing")
    g.add_argument("-j", "--workers", type=int, default=d["workers"], help="data loading processes")
    g.add_argument("--fake_size", type=_int_list, default=[512, 256],
                   help="train,val images of the synthetic 'fake' dataset")
    g.add_argument("--fake_image_size", type=int, default=d["fake_image_size"],
                   help="side of a 'fake' image, pixels")

    g = p.add_argument_group("device")
    g.add_argument("--gpus", default="0",
                   help="GPU ids, e.g. 0 or 0,1,3 (DataParallel); 'cpu' or no GPU present: CPU")
    g.add_argument("--type", default="torch.cuda.FloatTensor",
                   help="accepted for compatibility with the released scripts; the device follows --gpus")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast on GPU (LCR math stays fp32)")
    g.add_argument("--channels_last", action="store_true", help="channels-last memory format")
    g.add_argument("--gpu_data", action="store_true",
                   help="CIFAR: keep the data set on the training device and augment there (no workers)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="total epochs")
    g.add_argument("--start_epoch", type=int, default=0,
                   help="epoch to start from (0-based; also shifts the lr and EDE schedules)")
    g.add_argument("-b", "--batch_size", type=int, default=d["batch_size"],
                   help="training batch size over all devices, images")
    g.add_argument("-bt", "--batch_size_test", type=int, default=d["batch_size_test"],
                   help="evaluation batch size, images")
    g.add_argument("--lr", type=float, default=d["lr"], help="initial learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", type=float, default=d["weight_decay"], help="SGD weight decay")
    g.add_argument("--lr_type", default="cos", choices=("cos", "step"),
                   help="cos: cosine annealing per epoch to 0; step: x0.1 at --lr_decay_step")
    g.add_argument("--lr_decay_step", type=_int_list, default=[30, 60, 90],
                   help="epochs at which --lr_type step multiplies the lr by 0.1, e.g. 30,60,90")
    g.add_argument("--warm_up", action="store_true", help="linear lr warm-up over the first 5 epochs")
    g.add_argument("--Tmin", type=float, default=1e-3, help="EDE t at the first epoch")
    g.add_argument("--Tmax", type=float, default=10.0, help="EDE t at the end of training")

    g = p.add_argument_group("Lipschitz regulariser")
    g.add_argument("--alpha", type=float, default=8.0,
                   help="weight of the LCR loss; 0 trains plain IR-Net")
    g.add_argument("--lcr_variant", default="paper", choices=VARIANTS,
                   help="paper: retention matrices of every binary layer; official: released code's form")
    g.add_argument("--lcr_iters", type=int, default=5, help="power iterations per retention matrix")
    g.add_argument("--fp_weights", default="", metavar="FILE",
                   help="official form: weights of the frozen FP network (state dict or checkpoint)")
    g.add_argument("--lip_images", type=int, default=64,
                   help="validation images for the per-epoch empirical Lipschitz estimate (0: off)")
    g.add_argument("--lip_eps", type=float, default=0.01,
                   help="perturbation size of that estimate, relative to each image's norm")
    g.add_argument("--fp_pretrained", action="store_true",
                   help="official form: torchvision's ImageNet weights for the FP network (needs a network)")
    return p


def validate_args(parser, args):
    """Reject values that cannot work, with one line that says what to pass instead."""
    positive = dict(epochs=args.epochs, batch_size=args.batch_size, batch_size_test=args.batch_size_test,
                    print_freq=args.print_freq, lcr_iters=args.lcr_iters)
    for name, value in positive.items():
        if value <= 0:
            parser.error(f"--{name} must be a positive integer, got {value}")
    if args.alpha < 0:
        parser.error(f"--alpha must be >= 0 (0 trains plain IR-Net), got {args.alpha}")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.lip_images < 0 or args.lip_eps <= 0:
        parser.error(f"--lip_images must be >= 0 and --lip_eps > 0, got {args.lip_images} and {args.lip_eps}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if not 0 <= args.start_epoch < args.epochs:
        parser.error(f"--start_epoch must be in 0..{args.epochs - 1}, got {args.start_epoch}")
    if not 0 < args.Tmin <= args.Tmax:
        parser.error(f"need 0 < --Tmin <= --Tmax, got {args.Tmin} and {args.Tmax}")
    if len(args.fake_size) != 2 or min(args.fake_size) <= 0:
        parser.error(f"--fake_size needs two positive counts TRAIN,VAL, got {args.fake_size}")
    return args


def parse_args(defaults, description, argv=None):
    """Parse and validate ``argv`` with the defaults of one dataset family."""
    parser = get_args_parser(defaults, description)
    return validate_args(parser, parser.parse_args(argv))
