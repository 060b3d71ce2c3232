"""Training recipes of the model zoo: the flag defaults a model trains with unless the user gives them.

Each recipe is what the reference script for that network uses; ``utils/options.py`` fills every
flag the user did not pass from the recipe of ``--model``, and the run's ``args.json`` records the
resolved values. The table in docs/METHOD.md (section 5) lists them.
"""

# htqin/IR-Net CIFAR-10/ResNet20/1w1a/trainer.py: SGD 0.9, lr 0.1, wd 1e-4, batch 128, 400 epochs,
# cosine annealing to 0 per epoch, EDE t from 1e-3 to 10.
IRNET_RESNET20 = dict(epochs=400, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4, lr_type="cos",
                      warm_up=False, Tmin=1e-3, Tmax=10.0)

# htqin/IR-Net CIFAR-10/VGG-Small/main.py: lr 0.007, batch 128, 300 epochs, cosine, t from 0.1 to 10.
IRNET_VGG_SMALL = dict(epochs=300, batch_size=128, lr=0.007, momentum=0.9, weight_decay=1e-4, lr_type="cos",
                       warm_up=False, Tmin=0.1, Tmax=10.0)

# IR-Net publishes no training script for its CIFAR ResNet-18 (only the model file); this project
# uses the ResNet-20 script's recipe for it.
IRNET_CIFAR_RESNET18 = dict(IRNET_RESNET20)

# 42Shawn/LCR_BNN LCR/imagenet (utils/options.py defaults, with the README's --batch_size=128):
# lr 0.1, wd 1e-4, 100 epochs, cosine, no warm-up, t from 1e-3 to 10.
LCR_IMAGENET = dict(epochs=100, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4, lr_type="cos",
                    warm_up=False, Tmin=1e-3, Tmax=10.0)

FLAGS = tuple(IRNET_RESNET20)
"""The flags a recipe sets."""
