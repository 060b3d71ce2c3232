"""Command-line flags shared by ``cifar/main.py`` and ``imagenet/main.py``.

The flag names are the released code's (``--data_path``, ``--gpus``, ``--alpha``, ``-bt``, ...), so
the commands in the paper's README work as typed. Each script passes its dataset family's defaults.
The training recipe (epochs, batch size, lr, momentum, weight decay, lr schedule, EDE range) comes
from the chosen model's registry entry (``models/recipes.py``) for every such flag the user does
not give; the resolved values are what the run records.
"""
import argparse
import math
import os

import models
from models.recipes import FLAGS as RECIPE_FLAGS
from modules.lcr import SIGMA_F, SURROGATES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RESULTS_DIR = os.path.join(REPO_ROOT, "results")
VARIANTS = ("paper", "official")
MAX_SEED = 2**32 - 1  # numpy's RandomState takes seeds below 2**32; torch and Python take these too

CIFAR_DEFAULTS = dict(
    family="cifar", family_label="CIFAR-size (32 px)", dataset="cifar10",
    datasets=("cifar10", "cifar100", "digits", "fake"), model="resnet20_1w1a", data_path="./data",
    batch_size_test=256, workers=4,
)
IMAGENET_DEFAULTS = dict(
    family="imagenet", family_label="ImageNet-size (224 px)", dataset="imagenet", datasets=("imagenet", "fake"),
    model="resnet18_1w1a_IR", data_path=None, batch_size_test=128, workers=8,
)


def _int_list(text):
    """``"30,60"`` or ``"30 60"`` -> [30, 60]."""
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _models_of(family):
    return [n for n in models.list_models() if models.model_info(n).family == family]


def get_args_parser(defaults, description):
    """The argument parser of a training script whose dataset family's defaults are ``defaults``."""
    d = defaults
    names = _models_of(d["family"])
    recipe = "(default: the model's recipe, docs/METHOD.md section 5)"
    p = argparse.ArgumentParser(description=description)

    g = p.add_argument_group("run and output")
    g.add_argument("--results_dir", default=DEFAULT_RESULTS_DIR,
                   help="folder that holds run folders (default: results/ at the repository root)")
    g.add_argument("--save", default="", help="suffix of the run folder <results_dir>/<model><save>/ (default: none)")
    g.add_argument("--resume", nargs="?", const="auto", default="",
                   help="continue the run folder's checkpoint.pth.tar (no value), or start this run folder from "
                        "FILE (default: a fresh run)")
    g.add_argument("-e", "--evaluate", metavar="FILE", default="",
                   help="evaluate a checkpoint or bare state dict on the whole validation set, write "
                        "<FILE stem>_eval_<dataset>.json and exit; the model and dataset default to the "
                        "checkpoint's (default: train)")
    g.add_argument("--seed", type=int, default=1234,
                   help=f"random seed of the whole run, 0..{MAX_SEED} (default: 1234)")
    g.add_argument("-p", "--print_freq", type=int, default=0,
                   help="print every N iterations (default: 0, about 5 lines per epoch)")
    g.add_argument("--time_estimate", type=int, default=1,
                   help="1: print the estimated finish time after every epoch, 0: do not (default: 1)")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads of torch (default: 0, meaning 1 on a CPU-only run, which is several times "
                        "faster than 2 on a busy 2-core machine, and torch's own choice on GPU)")

    g = p.add_argument_group("model")
    g.add_argument("-a", "--model", default=None, choices=names, metavar="NAME",
                   help=f"{d['family_label']} network, one of: {', '.join(names)} (default: {d['model']}; "
                        f"with -e the checkpoint's)")
    g.add_argument("--model_fp", default=None, choices=names, metavar="NAME",
                   help="frozen full-precision network of the official LCR form (default: the model's FP twin)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, choices=d["datasets"],
                   help=f"dataset, one of {', '.join(d['datasets'])} (default: {d['dataset']}; with -e the "
                        f"checkpoint's)")
    g.add_argument("--data_path", default=None,
                   help=f"dataset folder (default: {d['data_path']}; with -e the checkpoint's)")
    if d["family"] == "cifar":
        g.add_argument("--download", action="store_true", help="download CIFAR into --data_path if missing")
        g.add_argument("--gpu_data", action="store_true",
                       help="keep the CIFAR training set on the training device and augment there (no workers)")
    g.add_argument("-j", "--workers", type=int, default=d["workers"],
                   help=f"data loading processes (default: {d['workers']})")
    g.add_argument("--fake_size", type=_int_list, default=None,
                   help="train,val images of the synthetic 'fake' dataset (default: 512,256; with -e the checkpoint's)")
    image = models.registry.FAMILIES[d["family"]]["image_size"]
    g.add_argument("--fake_image_size", type=int, default=None,
                   help=f"side of a 'fake' image in pixels (default: {image}; with -e the checkpoint's)")

    g = p.add_argument_group("device")
    g.add_argument("--gpus", default="0",
                   help="GPU ids, e.g. 0 or 0,1,3 (DataParallel); 'cpu' or no GPU present: CPU (default: 0)")
    g.add_argument("--type", default=None,
                   help="accepted for compatibility with the released scripts and ignored; the device follows --gpus")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast on GPU (the LCR maths stays fp32)")
    g.add_argument("--channels_last", action="store_true", help="channels-last memory format")

    g = p.add_argument_group("optimisation (defaults: the model's recipe)")
    g.add_argument("--epochs", type=int, default=None, help=f"total epochs {recipe}")
    g.add_argument("--start_epoch", type=int, default=0,
                   help="epoch to start from, 0-based; also shifts the lr and EDE schedules (default: 0)")
    g.add_argument("-b", "--batch_size", type=int, default=None,
                   help=f"training batch size over all devices, images {recipe}")
    g.add_argument("-bt", "--batch_size_test", type=int, default=d["batch_size_test"],
                   help=f"evaluation batch size, images (default: {d['batch_size_test']})")
    g.add_argument("--lr", type=float, default=None, help=f"initial learning rate {recipe}")
    g.add_argument("--momentum", type=float, default=None, help=f"SGD momentum in [0, 1) {recipe}")
    g.add_argument("--weight_decay", type=float, default=None, help=f"SGD weight decay {recipe}")
    g.add_argument("--lr_type", default=None, choices=("cos", "step"),
                   help=f"cos: cosine annealing per epoch to 0; step: x0.1 at --lr_decay_step {recipe}")
    g.add_argument("--lr_decay_step", type=_int_list, default=[30, 60, 90],
                   help="epochs at which --lr_type step multiplies the lr by 0.1 (default: 30,60,90)")
    g.add_argument("--warm_up", action="store_true", default=None,
                   help=f"linear lr warm-up over the first 5 epochs {recipe}")
    g.add_argument("--Tmin", type=float, default=None, help=f"EDE t at the first epoch {recipe}")
    g.add_argument("--Tmax", type=float, default=None, help=f"EDE t at the end of training {recipe}")
    g.add_argument("--precise_bn", type=int, default=0, metavar="BATCHES",
                   help="before each evaluation, re-estimate the BatchNorm running statistics as plain averages "
                        "over this many training batches (all of them when fewer), 0: off, the reference "
                        "recipes' choice (default: 0; docs/METHOD.md section 5)")

    g = p.add_argument_group("Lipschitz regulariser")
    g.add_argument("--alpha", type=float, default=8.0,
                   help="weight of the LCR loss; 0 trains plain IR-Net (default: 8)")
    g.add_argument("--lcr_variant", default="paper", choices=VARIANTS,
                   help="paper: retention matrices of every binary layer; official: the released code's form "
                        "(default: paper)")
    g.add_argument("--lcr_iters", type=int, default=0,
                   help="paper form: block power steps per retention matrix (default: 0, meaning 6 for matrices up "
                        "to 64 channels wide and 8 for wider ones; modules/singular.py)")
    g.add_argument("--lcr_surrogate", default="tanh", choices=SURROGATES,
                   help="paper form: how the LCR gradient passes the sign, tanh: d tanh(x)/dx, fixed; ede: the "
                        "layer's EDE, whose slope grows with t (default: tanh; docs/METHOD.md section 3)")
    g.add_argument("--lcr_sigma_f", default="differentiable", choices=SIGMA_F,
                   help="paper form: differentiable: the gradient of sigma of the real retention matrix reaches "
                        "the real activations too, which keeps them from shrinking; detached: a constant of the "
                        "loss, as the method gives it (default: differentiable; docs/METHOD.md section 3)")
    g.add_argument("--fp_weights", default="", metavar="FILE",
                   help="official form: weights of the frozen FP network (state dict or checkpoint)")
    g.add_argument("--fp_pretrained", action="store_true",
                   help="official form: torchvision's ImageNet weights for the FP network, as the released "
                        "code uses (from torch's hub cache, downloaded when there is a network)")
    g.add_argument("--lip_images", type=int, default=64,
                   help="validation images for the per-epoch empirical Lipschitz estimate, 0: off (default: 64)")
    g.add_argument("--lip_eps", type=float, default=0.01,
                   help="perturbation size of that estimate, relative to each image's norm (default: 0.01)")
    p.set_defaults(download=False, gpu_data=False)
    return p


DATA_DEFAULTS = ("dataset", "data_path", "fake_size", "fake_image_size")  # with -e: the checkpoint's


def data_defaults(defaults):
    """The dataset flags of a family when neither the user nor a checkpoint gives them."""
    image = models.registry.FAMILIES[defaults["family"]]["image_size"]
    return {"dataset": defaults["dataset"], "data_path": defaults["data_path"], "fake_size": [512, 256],
            "fake_image_size": image}


def fill_data_flags(args, saved, defaults):
    """Each dataset flag the user did not give: from ``saved`` (a checkpoint's arguments) when it has
    it, else the family's default."""
    fallback = data_defaults(defaults)
    for name in DATA_DEFAULTS:
        if getattr(args, name) is None:
            setattr(args, name, saved.get(name, fallback[name]) if isinstance(saved, dict) else fallback[name])
    return args


def apply_defaults(args, defaults):
    """Fill ``--model`` and the dataset flags (with ``-e`` left empty: they come from the checkpoint),
    then every recipe flag the user did not give from the model's recipe, and ``--model_fp``."""
    args.family = defaults["family"]
    if not args.evaluate:
        args.model = args.model or defaults["model"]
        fill_data_flags(args, {}, defaults)
    info = models.model_info(args.model or defaults["model"])
    for name in RECIPE_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, info.recipe[name])
    if args.model_fp is None and args.model:
        args.model_fp = info.fp_twin
    return args


def validate_args(parser, args):
    """Reject values that cannot work, with one line that says what to pass instead."""
    def need(ok, message):
        if not ok:
            parser.error(message)

    for name in ("epochs", "batch_size", "batch_size_test"):
        value = getattr(args, name)
        need(value > 0, f"--{name} must be a positive integer, got {value}")
    need(args.lcr_iters >= 0, f"--lcr_iters must be >= 0 (0: the default), got {args.lcr_iters}")
    for name in ("lr", "alpha", "lip_eps", "momentum", "weight_decay", "Tmin", "Tmax"):
        value = getattr(args, name)
        need(math.isfinite(value), f"--{name} must be a finite number, got {value}")
    need(args.alpha >= 0, f"--alpha must be >= 0 (0 trains plain IR-Net), got {args.alpha}")
    need(args.lr > 0, f"--lr must be positive, got {args.lr}")
    need(0 <= args.momentum < 1, f"--momentum must be in [0, 1), got {args.momentum}")
    need(args.weight_decay >= 0, f"--weight_decay must be >= 0, got {args.weight_decay}")
    need(args.lip_eps > 0, f"--lip_eps must be positive, got {args.lip_eps}")
    need(args.lip_images >= 0, f"--lip_images must be >= 0, got {args.lip_images}")
    need(args.print_freq >= 0, f"--print_freq must be >= 0 (0: about 5 lines per epoch), got {args.print_freq}")
    need(args.lcr_sigma_f == "detached" or args.lcr_surrogate == "tanh",
         "--lcr_surrogate ede needs --lcr_sigma_f detached (a differentiable sigma_F works with tanh only)")
    need(args.precise_bn >= 0, f"--precise_bn must be >= 0 (0: off), got {args.precise_bn}")
    need(args.threads >= 0, f"--threads must be >= 0 (0: the default), got {args.threads}")
    need(args.workers >= 0, f"--workers must be >= 0, got {args.workers}")
    need(0 <= args.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    need(0 <= args.start_epoch < args.epochs, f"--start_epoch must be in 0..{args.epochs - 1}, got {args.start_epoch}")
    need(0 < args.Tmin <= args.Tmax, f"need 0 < --Tmin <= --Tmax, got {args.Tmin} and {args.Tmax}")
    need(args.fake_size is None or (len(args.fake_size) == 2 and min(args.fake_size) > 0),
         f"--fake_size needs two positive counts TRAIN,VAL, got {args.fake_size}")
    need(args.fake_image_size is None or args.fake_image_size > 0,
         f"--fake_image_size must be positive, got {args.fake_image_size}")
    need(all(s > 0 for s in args.lr_decay_step), f"--lr_decay_step needs positive epochs, got {args.lr_decay_step}")
    return args


def family_defaults(family):
    """The defaults of the training script of a model family ("cifar" or "imagenet")."""
    return {"cifar": CIFAR_DEFAULTS, "imagenet": IMAGENET_DEFAULTS}[family]


def parse_args(defaults, description, argv=None):
    """Parse and validate ``argv`` with the defaults of one dataset family."""
    parser = get_args_parser(defaults, description)
    return validate_args(parser, apply_defaults(parser.parse_args(argv), defaults))
