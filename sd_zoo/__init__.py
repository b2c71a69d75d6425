"""sd-zoo: stochastic-depth ResNets (Huang et al., ECCV 2016) as timm models.

Importing the package registers the models with timm::

    import sd_zoo, timm
    model = timm.create_model('sd_resnet110')   # p_L = 0.5, linear decay, paper scaling rule
"""
from .errors import SDZooError
from .stochastic_depth import StochasticDepth, expected_depth, survival_probs
from .sd_cifar_resnet import SDCifarResNet
from .sd_imagenet_resnet import SDImageNetResNet

__version__ = '0.1.0'
