"""The timm model interface shared by the stochastic-depth ResNets (CIFAR and ImageNet families).

A subclass builds ``conv1``, ``bn1``, ``act1``, ``maxpool`` (``nn.Identity`` for CIFAR), the stages
``layer1..layerN`` of gated residual blocks, ``global_pool`` and ``fc``; this base gives it
forward_features / forward_head / forward_intermediates, features_only through timm's getter wrapper,
classifier reset, gradient checkpointing and parameter grouping, and draws the gates of every block at
the start of each training forward (one RNG call per mini-batch).
"""
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import create_classifier, get_act_layer, get_device_dtype, get_norm_layer
from timm.models import build_model_with_cfg, checkpoint_seq
from timm.models._features import feature_take_indices

from ..errors import ConfigError, InputShapeError, WeightsError
from .inputs import UINT8_IMAGES, check_normalized_values, dtype_name
from .block_slots import apply_keep_blocks
from .tags import resolve_tag, tag_model_args
from .stochastic_depth import GATES, RULES, StochasticDepthMixin, survival_probs


def is_tracing() -> bool:
    """True while FX, TorchScript tracing, dynamo or the ONNX exporter is tracing the model."""
    return bool(
        torch.jit.is_tracing()
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
    )


def check_input(x: torch.Tensor, in_chans: int, model_name: str, values: bool = False) -> None:
    """Raise a readable error for a batch that is not float (N, in_chans, H, W), or with ``values`` whose
    values no normalised image has; a no-op while tracing."""
    if is_tracing():
        return
    if not x.is_floating_point():
        raise InputShapeError(
            f'{model_name} expects a normalised float tensor (N, {in_chans}, H, W), got {dtype_name(x)} of shape '
            f'{tuple(x.shape)}; for {UINT8_IMAGES} use sd_zoo.evaluation.evaluate.model_logits_fn(model, mean, std), '
            f'or convert them with (x.permute(0, 3, 1, 2).float() / 255 - mean) / std')
    if x.ndim != 4 or x.shape[1] != in_chans:
        hint = ''
        if x.ndim == 3:
            hint = ' (a single image? add a batch dimension with x.unsqueeze(0))'
        elif x.ndim == 4 and x.shape[-1] == in_chans:
            hint = ' (channels-last layout? use x.permute(0, 3, 1, 2))'
        raise InputShapeError(
            f'{model_name} expects a float tensor of shape (N, {in_chans}, H, W), got {tuple(x.shape)}{hint}; '
            f'for another number of channels build the model with in_chans=C')
    if values:
        check_normalized_values(x, model_name)


class BuildArgs(NamedTuple):
    """The resolved shared settings a subclass builds its stem and blocks with."""
    act_layer: type
    norm_layer: type
    probs: List[float]
    gate: str
    rule: str
    global_pool: str
    keep_blocks: Optional[Sequence[int]]
    dd: Dict[str, Any]


class SDResNetBase(StochasticDepthMixin, nn.Module):
    """timm's standard model interface over a stem, ``num_stages`` stages of gated blocks and a head."""

    def setup(
            self,
            num_blocks: int,
            num_classes: int,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.5,
            sd_schedule: str = 'linear',
            sd_probs: Optional[Sequence[float]] = None,
            sd_gate: str = 'batch',
            sd_rule: str = 'paper',
            sd_keep_blocks: Optional[Sequence[int]] = None,
            act_layer: Union[str, type] = 'relu',
            norm_layer: Union[str, type] = 'batchnorm2d',
            drop_block_rate: float = 0.0,
            device=None,
            dtype=None,
    ) -> 'BuildArgs':
        """Check and keep the settings every sd-zoo ResNet shares; returns what the subclass builds its body with.

        Args:
            num_blocks: L, the number of gated residual blocks of the net.
            num_classes: classifier outputs (0 for none).
            in_chans: input channels.
            global_pool: timm pooling type of the head.
            drop_rate: dropout before the classifier.
            drop_path_rate: 1 - p_L, the drop probability of the last block (0.5 in the paper; 0 = constant depth).
            sd_schedule: ``'linear'`` (paper) or ``'uniform'`` decay of survival probabilities over blocks.
            sd_probs: explicit per-block survival probabilities (overrides the two above).
            sd_gate: ``'batch'`` (paper: one draw per block per mini-batch, dropped branches are not computed)
                or ``'sample'`` (one draw per sample, as timm's DropPath).
            sd_rule: ``'paper'`` (eval scales the branch by p_l) or ``'inverted'`` (train divides by p_l).
            sd_keep_blocks: build the net depth-pruned, keeping only these blocks (0-based, in forward order);
                see :func:`sd_zoo.prune_blocks`.
            act_layer, norm_layer: timm layer names or classes.
            drop_block_rate: not supported (timm's interface); must stay 0.
            device, dtype: where and in which type to create the parameters.
        """
        if drop_block_rate:
            raise ConfigError('drop_block_rate is not supported by sd-zoo ResNets; leave it at 0')
        if sd_gate not in GATES:
            raise ConfigError(f'unknown sd_gate {sd_gate!r}; choose one of {GATES}')
        if sd_rule not in RULES:
            raise ConfigError(f'unknown sd_rule {sd_rule!r}; choose one of {RULES}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.sd_keep_blocks = None
        probs = survival_probs(num_blocks, drop_path_rate, sd_schedule if sd_probs is None else sd_probs)
        # What sd_config() reports: exactly the keyword arguments that rebuild these probabilities.
        self._sd_args = dict(drop_path_rate=float(drop_path_rate), sd_schedule=sd_schedule) if sd_probs is None \
            else dict(sd_probs=probs)
        self._sd_args.update(sd_gate=sd_gate, sd_rule=sd_rule)
        return BuildArgs(get_act_layer(act_layer), get_norm_layer(norm_layer), probs, sd_gate, sd_rule, global_pool,
                         sd_keep_blocks, dict(device=device, dtype=dtype))

    def finish(self, args: 'BuildArgs', num_features: int, **init_kwargs) -> None:
        """Add the head, initialise the weights and prune to ``sd_keep_blocks`` when the net is built pruned."""
        self.num_features = self.head_hidden_size = num_features
        self.global_pool, self.fc = create_classifier(num_features, self.num_classes, pool_type=args.global_pool,
                                                      **args.dd)
        self.init_weights(**init_kwargs)
        if args.keep_blocks is not None:
            apply_keep_blocks(self, args.keep_blocks)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._begin_forward(x)
        return self.act1(self.bn1(self.conv1(x)))

    @torch.jit.ignore
    def _stages(self) -> List[nn.Sequential]:
        return [getattr(self, f'layer{i + 1}') for i in range(self.num_stages)]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self._hold_gate_plans(enable)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False):
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        dd = get_device_dtype(self)
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    @torch.jit.ignore
    def _begin_forward(self, x: torch.Tensor) -> None:
        """Check the input and, in training, draw this mini-batch's gates for every block."""
        # Values are checked at inference on the CPU only: reading one on an accelerator would synchronise
        # every forward, and training batches come normalised from sd-zoo's own loader.
        check_input(x, self.in_chans, getattr(self, 'pretrained_cfg', {}).get('architecture', type(self).__name__),
                    values=not self.training and x.device.type == 'cpu')
        if self.training and not is_tracing():
            self.plan_gates(x.shape[0])

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the stem and of each stage (CIFAR: 4 levels, ImageNet: 5) and optionally the last.

        Args:
            indices: take the last n levels if int, all if None, or the listed levels.
            norm: unused (no final norm in a post-activation ResNet), kept for timm's interface.
            stop_early: stop after the last requested level.
            output_fmt: only 'NCHW'.
            intermediates_only: return only the intermediates.
        """
        assert output_fmt == 'NCHW', 'Output format must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(self.num_stages + 1, indices)
        x = self.forward_stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = self._stages()
        if stop_early:
            stages = stages[:max_index]
        for feat_idx, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(self.num_stages + 1, indices)
        for i in range(max_index, self.num_stages):
            setattr(self, f'layer{i + 1}', nn.Sequential())
        if max_index == 0:
            self.maxpool = nn.Identity()
        if max_index < self.num_stages:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or max_index < self.num_stages:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.forward_stem(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self._stages(), x, flatten=True)
        return self.forward_stages(x)

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        """The stages in order; subclasses name them explicitly so that TorchScript can compile it."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ``create_model(..., pretrained=True)`` takes verified tensors from sd_zoo.weights, which hands its reader over
# when it is imported (importing sd_zoo does): the networks import nothing of the weights files and the Hub.
_pretrained_reader: Optional[Callable[..., Optional[Dict[str, torch.Tensor]]]] = None


def set_pretrained_reader(reader: Callable[..., Optional[Dict[str, torch.Tensor]]]) -> None:
    """Set ``reader(variant, pretrained_cfg, pretrained_cfg_overlay, cache_dir)``, which returns the verified
    tensors ``create_model(..., pretrained=True)`` loads (None where the caller hands over weights itself)."""
    global _pretrained_reader
    _pretrained_reader = reader


def create_sd_model(model_cls, variant: str, pretrained: bool = False, feature_levels: int = 4, **kwargs):
    """Build a registered sd-zoo model through timm, with the settings of its tag and verified weights."""
    tag = resolve_tag(variant, kwargs.get('pretrained_cfg'))
    for k, v in tag_model_args(variant, tag).items():
        kwargs.setdefault(k, v)
    state, keep = None, None
    if pretrained:
        keep = kwargs.pop('sd_keep_blocks', None)  # prune after the full weights have loaded
        if _pretrained_reader is None:
            raise WeightsError('no reader of pretrained weights is set: import sd_zoo (not only sd_zoo.models)')
        state = _pretrained_reader(
            variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'), kwargs.get('cache_dir'))
    if state is not None:
        # timm's loader (head reset for another class count, first-conv adaptation for in_chans) then
        # takes these verified tensors instead of reading the file again unchecked.
        kwargs['pretrained_cfg_overlay'] = dict(kwargs.get('pretrained_cfg_overlay') or {}, state_dict=state,
                                                source='state_dict')
    if kwargs.get('features_only'):
        kwargs.setdefault('out_indices', tuple(range(feature_levels)))
    model = build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=dict(feature_cls='getter'), **kwargs)
    if state is not None:
        cfg = dict(model.pretrained_cfg)
        cfg.pop('state_dict', None)
        given = kwargs.get('pretrained_cfg')
        cfg['source'] = given.get('source') if isinstance(given, dict) else None
        model.pretrained_cfg = model.default_cfg = cfg
    if keep is not None:
        apply_keep_blocks(model, keep)
    return model
