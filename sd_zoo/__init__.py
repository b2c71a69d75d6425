"""sd-zoo: stochastic-depth ResNets (Huang et al., ECCV 2016) as timm models.

Importing the package registers the models with timm::

    import sd_zoo, timm
    model = timm.create_model('sd_resnet110')   # p_L = 0.5, linear decay, paper scaling rule

:func:`load_model` loads a pretrained tag, a Hub folder or a weights file with the settings and the
normalisation its weights were trained with.
"""
from .errors import SDZooError
from .models import SDCifarResNet, SDImageNetResNet, StochasticDepth, expected_depth, survival_probs
from .weights import pretrained  # noqa: F401  (hands the models their reader of verified pretrained weights)
from .weights.loader import load_model
from .deploy.pruning import prune_blocks
from .evaluation.uncertainty import mc_predict

__version__ = '0.2.0'
