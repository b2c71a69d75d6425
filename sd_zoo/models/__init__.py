"""The networks: the stochastic-depth mechanism, the ResNet families and their timm registration.

Importing this package registers every sd-zoo architecture and pretrained tag with timm. Nothing here
imports the rest of sd_zoo but its error types; ``sd_zoo.weights`` hands over the reader of pretrained
weights (:func:`sd_resnet_base.set_pretrained_reader`) when ``sd_zoo`` is imported.
"""
from .sd_cifar_resnet import SDCifarResNet
from .sd_imagenet_resnet import SDImageNetResNet
from .stochastic_depth import StochasticDepth, expected_depth, survival_probs
