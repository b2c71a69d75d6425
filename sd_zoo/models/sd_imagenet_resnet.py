"""ImageNet ResNets (50, 101, 152) with stochastic depth, in timm's / torchvision's layout.

Bottleneck blocks with projection shortcuts (1x1 conv + BN) at stage transitions, 7x7 stem with max
pooling, built from timm's own ``Bottleneck`` and ``make_blocks``; each block gets a stochastic-depth
gate (the paper trains ResNet-152 with p_L = 0.5, linear decay).

Key map for ImageNet ResNet weights: the identity. Parameter and buffer names are those of timm's
``resnet50/101/152`` and torchvision's ``resnet50/101/152`` (``conv1``, ``bn1``, ``layerS.B.conv1..bn3``,
``layerS.0.downsample.0/1``, ``fc``); the gates hold no state. :func:`load_imagenet_resnet_weights`
loads such a state dict strictly and reports any mismatch.
"""
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from timm.layers import register_notrace_module
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, make_blocks

from ..errors import ConfigError, WeightsError
from .tags import imagenet_cfg
from .sd_resnet_base import SDResNetBase, create_sd_model
from .stochastic_depth import ResidualGateMixin, StochasticDepth

__all__ = ['SDImageNetResNet', 'SDBottleneck', 'load_imagenet_resnet_weights']


@register_notrace_module
class SDBottleneck(ResidualGateMixin, Bottleneck):
    """timm's Bottleneck with a stochastic-depth gate in place of its DropPath."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stochastic_depth = StochasticDepth()

    def branch_norm(self) -> Optional[nn.Module]:
        # A squeeze-excitation after bn3 rescales by a function of its own input, which p_l does not pass.
        return self.bn3 if self.se is None else None

    def output_activation(self) -> nn.Module:
        return self.act3

    def forward_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward_branch(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.drop_block(self.bn2(self.conv2(x))))
        x = self.bn3(self.conv3(self.aa(x)))
        return self.se(x) if self.se is not None else x

    def forward_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.act3(x)


class SDImageNetResNet(SDResNetBase):
    """ImageNet ResNet with bottleneck blocks, projection shortcuts and stochastic depth.

    Args:
        layers: blocks per stage, e.g. (3, 8, 36, 3) for ResNet-152.
        num_classes: classifier outputs (0 for none).
        zero_init_last: zero-initialise each branch's last BatchNorm scale (timm's default for ResNets).
        **kwargs: the stochastic-depth settings and timm's common arguments: see :meth:`SDResNetBase.setup`.
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (3, 8, 36, 3),
            num_classes: int = 1000,
            zero_init_last: bool = True,
            **kwargs,
    ):
        super().__init__()
        if len(layers) != 4:
            raise ConfigError(f'the ImageNet ResNets have 4 stages; got layers={layers}')
        args = self.setup(sum(layers), num_classes, **kwargs)
        dd = args.dd

        self.conv1 = nn.Conv2d(self.in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = args.norm_layer(64, **dd)
        self.act1 = args.act_layer(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=64, reduction=2, module='act1')]
        channels = (64, 128, 256, 512)
        stages, stage_info = make_blocks(
            (SDBottleneck,) * len(layers), channels, layers, 64,
            act_layer=args.act_layer, norm_layer=args.norm_layer, **dd)
        for name, stage in stages:
            self.add_module(name, stage)
        self.feature_info.extend(stage_info)
        self.num_stages = len(layers)

        blocks = [b for _, stage in stages for b in stage]
        for block, p in zip(blocks, args.probs):
            block.stochastic_depth = StochasticDepth(p, gate=args.gate, rule=args.rule)
        self.finish(args, channels[-1] * SDBottleneck.expansion, zero_init_last=zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, SDBottleneck):
                    m.zero_init_last()

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def load_imagenet_resnet_weights(model: SDImageNetResNet, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load a timm or torchvision ImageNet ResNet state dict (same depth) into ``model``.

    The key map is the identity; a state dict of another depth or family fails with the missing and
    unexpected keys named.
    """
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f'state dict does not fit {type(model).__name__}: missing keys {result.missing_keys[:8]}'
            f'{" ..." if len(result.missing_keys) > 8 else ""}, unexpected keys {result.unexpected_keys[:8]}'
            f'{" ..." if len(result.unexpected_keys) > 8 else ""}; ImageNet ResNet weights of the same depth '
            f'(timm resnetNN or torchvision resnetNN) load with the identity key map')


def _create(variant: str, layers: Tuple[int, ...], pretrained: bool = False, **kwargs) -> SDImageNetResNet:
    return create_sd_model(SDImageNetResNet, variant, pretrained, feature_levels=5, layers=layers, **kwargs)


default_cfgs = generate_default_cfgs({
    f'{arch}.in1k': imagenet_cfg(arch, 'in1k') for arch in ('sd_resnet50', 'sd_resnet101', 'sd_resnet152')})


@register_model
def sd_resnet50(pretrained: bool = False, **kwargs) -> SDImageNetResNet:
    """ImageNet ResNet-50 with stochastic depth."""
    return _create('sd_resnet50', (3, 4, 6, 3), pretrained, **kwargs)


@register_model
def sd_resnet101(pretrained: bool = False, **kwargs) -> SDImageNetResNet:
    """ImageNet ResNet-101 with stochastic depth."""
    return _create('sd_resnet101', (3, 4, 23, 3), pretrained, **kwargs)


@register_model
def sd_resnet152(pretrained: bool = False, **kwargs) -> SDImageNetResNet:
    """ImageNet ResNet-152 with stochastic depth, the paper's ImageNet model."""
    return _create('sd_resnet152', (3, 8, 36, 3), pretrained, **kwargs)
