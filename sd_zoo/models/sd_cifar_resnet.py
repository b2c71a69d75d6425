"""CIFAR ResNets with stochastic depth, as in the paper's code (He et al. 2016 CIFAR nets, option A).

Three stages of ``n`` basic blocks with 16, 32 and 64 channels; post-activation blocks
Conv3x3-BN-ReLU-Conv3x3-BN, add, ReLU; stem Conv3x3-BN-ReLU; at the two transitions the shortcut is a
stride-2 average pooling and zero channel padding, so no parameters; global average pooling and a
linear classifier. Depth is ``6n + 2``: ResNet-110 has n = 18 (54 blocks, about 1.7M parameters),
ResNet-1202 n = 200 (about 19.4M). The SVHN net of the paper is the same net with n = 25 (152 layers),
registered as ``sd_svhn_resnet152`` so that it cannot be confused with the ImageNet ``sd_resnet152``.

The transition pooling has a 1x1 window (a plain subsampling) as in the code the paper was run with;
the authors' repository switched to a 2x2 window in 2017, which ``sd_shortcut_pool=2`` selects.
BatchNorm scales start at 1 (torch's default); the paper's Torch7 code used cudnn.torch, whose
BatchNorm draws them uniformly from [0, 1]: ``bn_init='uniform'`` reproduces that.

Every block, transitions included, carries a stochastic-depth gate (``stochastic_depth.py``); by default
``p_L = 0.5`` with the paper's linear decay.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import register_notrace_module
from timm.models import generate_default_cfgs, register_model

from ..errors import ConfigError
from .tags import cifar_cfg, trainable_tags
from .sd_resnet_base import SDResNetBase, create_sd_model
from .stochastic_depth import ResidualGateMixin, StochasticDepth

__all__ = ['SDCifarResNet', 'CifarBasicBlock', 'ZeroPadShortcut']

BN_INITS = ('ones', 'uniform')


class ZeroPadShortcut(nn.Module):
    """Parameter-free transition shortcut: average-pool with stride ``stride`` and pad new channels with zeros."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, pool_size: int = 1):
        super().__init__()
        self.pool = nn.AvgPool2d(kernel_size=pool_size, stride=stride) if stride > 1 else nn.Identity()
        self.in_chs, self.stride, self.pool_size = in_chs, stride, pool_size if stride > 1 else 1
        self.pad_chs = out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        if self.pad_chs > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad_chs))
        return x

    def as_conv(self) -> nn.Conv2d:
        """The same map as a strided convolution: channel c averages its window into channel c, new ones get 0.

        Exact, and it keeps ONNX Runtime's CPU graph in its blocked channel layout (see ``onnx_export``).
        """
        k = self.pool_size
        conv = nn.Conv2d(self.in_chs, self.in_chs + self.pad_chs, k, stride=self.stride, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[torch.arange(self.in_chs), torch.arange(self.in_chs)] = 1.0 / (k * k)
        return conv


@register_notrace_module  # FX keeps the gate (Python control flow) inside a leaf module
class CifarBasicBlock(ResidualGateMixin, nn.Module):
    """Post-activation basic block ``act(shortcut(x) + gate * bn2(conv2(act(bn1(conv1(x))))))``."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            survival_prob: float = 1.0,
            gate: str = 'batch',
            rule: str = 'paper',
            shortcut_pool: int = 1,
            act_layer=nn.ReLU,
            norm_layer=nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = norm_layer(out_chs, **dd)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False, **dd)
        self.bn2 = norm_layer(out_chs, **dd)
        needs_shortcut = stride != 1 or in_chs != out_chs
        self.shortcut = ZeroPadShortcut(in_chs, out_chs, stride, shortcut_pool) if needs_shortcut else nn.Identity()
        self.act2 = act_layer(inplace=True)
        self.stochastic_depth = StochasticDepth(survival_prob, gate=gate, rule=rule)

    def branch_norm(self) -> nn.Module:
        return self.bn2

    def output_activation(self) -> nn.Module:
        return self.act2

    def forward_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x)

    def forward_branch(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(x))

    def forward_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(x)


class SDCifarResNet(SDResNetBase):
    """CIFAR ResNet (depth 6n + 2) with stochastic depth.

    Args:
        blocks_per_stage: n, the number of basic blocks in each of the three stages.
        channels: widths of the three stages.
        num_classes: classifier outputs (0 for none).
        sd_shortcut_pool: window of the transition shortcut's average pooling: 1 (the paper's code) or 2
            (the authors' later code).
        bn_init: ``'ones'`` (torch's default BatchNorm scale) or ``'uniform'`` (U[0, 1], as cudnn.torch).
        zero_init_last: zero-initialise each branch's last BatchNorm scale (not in the paper's code;
            ``sd_resnet1202`` turns it on, see there).
        **kwargs: the stochastic-depth settings (``drop_path_rate``, ``sd_schedule``, ``sd_probs``, ``sd_gate``,
            ``sd_rule``, ``sd_keep_blocks``) and timm's common arguments: see :meth:`SDResNetBase.setup`.
    """

    def __init__(
            self,
            blocks_per_stage: int = 18,
            channels: Tuple[int, ...] = (16, 32, 64),
            num_classes: int = 10,
            sd_shortcut_pool: int = 1,
            bn_init: str = 'ones',
            zero_init_last: bool = False,
            **kwargs,
    ):
        super().__init__()
        if len(channels) != 3:
            raise ConfigError(f'the CIFAR ResNets have 3 stages; got {len(channels)} channel widths')
        if blocks_per_stage < 1:
            raise ConfigError(f'blocks_per_stage must be >= 1, got {blocks_per_stage}')
        if sd_shortcut_pool not in (1, 2):
            raise ConfigError(f'sd_shortcut_pool must be 1 (the paper\'s code) or 2, got {sd_shortcut_pool!r}')
        if bn_init not in BN_INITS:
            raise ConfigError(f'unknown bn_init {bn_init!r}; choose one of {BN_INITS}')
        args = self.setup(3 * blocks_per_stage, num_classes, **kwargs)
        self._sd_args['sd_shortcut_pool'] = sd_shortcut_pool
        dd = args.dd

        self.conv1 = nn.Conv2d(self.in_chans, channels[0], 3, padding=1, bias=False, **dd)
        self.bn1 = args.norm_layer(channels[0], **dd)
        self.act1 = args.act_layer(inplace=True)
        self.maxpool = nn.Identity()
        self.feature_info = [dict(num_chs=channels[0], reduction=1, module='act1')]

        in_chs, reduction, block_idx = channels[0], 1, 0
        for stage_idx, out_chs in enumerate(channels):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(CifarBasicBlock(
                    in_chs, out_chs, stride=stride if i == 0 else 1, survival_prob=args.probs[block_idx],
                    gate=args.gate, rule=args.rule, shortcut_pool=sd_shortcut_pool, act_layer=args.act_layer,
                    norm_layer=args.norm_layer, **dd))
                in_chs = out_chs
                block_idx += 1
            self.add_module(f'layer{stage_idx + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'layer{stage_idx + 1}'))
        self.num_stages = len(channels)
        self.finish(args, channels[-1], zero_init_last=zero_init_last, bn_init=bn_init)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = False, bn_init: str = 'ones') -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d) and bn_init == 'uniform':
                nn.init.uniform_(m.weight, 0.0, 1.0)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, CifarBasicBlock):
                    m.zero_init_last()

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(x)))


def _create(variant: str, blocks_per_stage: int, pretrained: bool = False, **kwargs) -> SDCifarResNet:
    return create_sd_model(SDCifarResNet, variant, pretrained, blocks_per_stage=blocks_per_stage, **kwargs)


# Every architecture takes every tag of the data the trainer supports (what a tag means:
# sd_zoo.models.tags.TAGS), so that a user's own run of any of them publishes under its tag.
# The first tag is the default.
CIFAR_ARCHS = ('sd_resnet20', 'sd_resnet32', 'sd_resnet44', 'sd_resnet56', 'sd_resnet110', 'sd_resnet1202',
               'sd_svhn_resnet152')
default_cfgs = generate_default_cfgs({
    f'{arch}.{tag}': cifar_cfg(arch, tag) for arch in CIFAR_ARCHS
    for tag in (('svhn',) if arch == 'sd_svhn_resnet152' else ()) + trainable_tags()})


@register_model
def sd_resnet20(pretrained: bool = False, **kwargs) -> SDCifarResNet:
    """CIFAR ResNet-20 (3 x 3 blocks) with stochastic depth."""
    return _create('sd_resnet20', 3, pretrained, **kwargs)


@register_model
def sd_resnet32(pretrained: bool = False, **kwargs) -> SDCifarResNet:
    """CIFAR ResNet-32 (3 x 5 blocks) with stochastic depth."""
    return _create('sd_resnet32', 5, pretrained, **kwargs)


@register_model
def sd_resnet44(pretrained: bool = False, **kwargs) -> SDCifarResNet:
    """CIFAR ResNet-44 (3 x 7 blocks) with stochastic depth."""
    return _create('sd_resnet44', 7, pretrained, **kwargs)


@register_model
def sd_resnet56(pretrained: bool = False, **kwargs) -> SDCifarResNet:
    """CIFAR ResNet-56 (3 x 9 blocks) with stochastic depth."""
    return _create('sd_resnet56', 9, pretrained, **kwargs)


@register_model
def sd_resnet110(pretrained: bool = False, **kwargs) -> SDCifarResNet:
    """CIFAR ResNet-110 (3 x 18 blocks), the paper's main CIFAR model: p_L = 0.5, linear decay."""
    return _create('sd_resnet110', 18, pretrained, **kwargs)


@register_model
def sd_resnet1202(pretrained: bool = False, **kwargs) -> SDCifarResNet:
    """CIFAR ResNet-1202 (3 x 200 blocks), the paper's 1202-layer net.

    A fresh, untrained model in eval mode has identity BatchNorms (running mean 0, var 1), so 600 residual
    additions grow activations past float32's range; zero-initialising each branch's last BatchNorm scale
    keeps a fresh model finite. Trained weights are unaffected; pass ``zero_init_last=False`` for the
    paper's initialisation (which trains the same, since training-mode BatchNorm normalises).
    """
    kwargs.setdefault('zero_init_last', True)
    return _create('sd_resnet1202', 200, pretrained, **kwargs)


@register_model
def sd_svhn_resnet152(pretrained: bool = False, **kwargs) -> SDCifarResNet:
    """The paper's SVHN net: the CIFAR ResNet with 3 x 25 basic blocks (152 layers), not ImageNet's ResNet-152."""
    return _create('sd_svhn_resnet152', 25, pretrained, **kwargs)
