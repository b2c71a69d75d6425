"""The stochastic-depth mechanism of Huang et al., "Deep Networks with Stochastic Depth" (ECCV 2016).

A residual block computes ``H_l = act(id(H_{l-1}) + b_l * f_l(H_{l-1}))`` in training, where the gate
``b_l`` is a Bernoulli draw with survival probability ``p_l``. This module holds:

* survival schedules: ``linear`` (paper eq. 4, ``p_l = 1 - (l / L) (1 - p_L)`` for ``l = 1..L`` over all
  blocks of the net, transition blocks included), ``uniform`` (``p_l = p_L``) or an explicit list;
* :class:`StochasticDepth`, the per-block gate with its two granularities (``batch``: one draw per block
  per mini-batch, as in the paper; ``sample``: one draw per sample, as timm's DropPath) and its two scaling
  rules (``paper``: train unscaled, eval multiplies the branch by ``p_l``; ``inverted``: train divides the
  kept branch by ``p_l``, eval is the identity gate);
* :class:`ResidualGateMixin`, the forward pass shared by every block: with the batch gate a dropped
  block's branch is not computed at all, forward or backward;
* :class:`StochasticDepthMixin`, the model-level view: survival probabilities, expected depth, the gate
  generator hook, and per-mini-batch gate planning.

timm's ``drop_path_rate`` means ``1 - p_L`` here, so ``drop_path_rate=0.5`` is the paper's setting and
``0.0`` is constant depth.
"""
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import ConfigError

SCHEDULES = ('linear', 'uniform')
GATES = ('batch', 'sample')
RULES = ('paper', 'inverted')

ProbSpec = Union[str, Sequence[float]]


def survival_probs(
        num_blocks: int,
        drop_path_rate: float = 0.5,
        schedule: ProbSpec = 'linear',
) -> List[float]:
    """Per-block survival probabilities, block 1 first.

    Args:
        num_blocks: L, the number of residual blocks that can be dropped.
        drop_path_rate: 1 - p_L, the drop probability of the last block.
        schedule: ``'linear'``, ``'uniform'``, or an explicit sequence of L probabilities
            (then ``drop_path_rate`` is ignored).
    """
    if num_blocks < 1:
        raise ConfigError(f'num_blocks must be >= 1, got {num_blocks}')
    if not isinstance(schedule, str):
        probs = [float(p) for p in schedule]
        if len(probs) != num_blocks:
            raise ConfigError(
                f'explicit survival probabilities: got {len(probs)} values for a net of {num_blocks} blocks; '
                f'give exactly one probability per block')
        for i, p in enumerate(probs):
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f'survival probability of block {i + 1} is {p}; each must lie in [0, 1]')
        return probs
    drop_path_rate = float(drop_path_rate)
    if not 0.0 <= drop_path_rate <= 1.0:
        raise ConfigError(
            f'drop_path_rate (= 1 - p_L) must lie in [0, 1], got {drop_path_rate}; '
            f'0.5 is the paper setting, 0 gives constant depth')
    if schedule == 'linear':
        return [1.0 - (l / num_blocks) * drop_path_rate for l in range(1, num_blocks + 1)]
    if schedule == 'uniform':
        return [1.0 - drop_path_rate] * num_blocks
    raise ConfigError(f'unknown survival schedule {schedule!r}; choose one of {SCHEDULES} or give a list')


def describe_depth(model_args: Dict[str, object]) -> str:
    """``'constant depth'`` or ``'stochastic depth (p_L = 0.5)'`` for a model's create_model arguments."""
    probs = model_args.get('sd_probs')
    p_last = float(probs[-1]) if probs else 1.0 - float(model_args.get('drop_path_rate', 0.5))
    if (all(float(p) == 1.0 for p in probs) if probs else p_last == 1.0):
        return 'constant depth'
    return f'stochastic depth (p_L = {p_last:g})'


def check_gate_generator(generator: Optional[torch.Generator]) -> None:
    """ConfigError unless ``generator`` is None or a CPU ``torch.Generator``: gates are decided on the host."""
    if generator is not None and generator.device.type != 'cpu':
        raise ConfigError('the gate generator must be a CPU torch.Generator (gates are decided on the host)')


def expected_depth(probs: Iterable[float]) -> float:
    """Expected number of residual blocks executed per training mini-batch: sum of p_l (paper eq. 5)."""
    return float(sum(probs))


class _SkippedBranch(torch.autograd.Function):
    """Pass the shortcut through while handing each branch parameter a zero gradient.

    A dropped block computes nothing, yet every parameter still receives a gradient (zeros, not None), so
    momentum and weight decay act on it as in the paper's code, DDP needs no ``find_unused_parameters``,
    and nothing depends on which blocks happened to run. The zeros are only allocated in backward.
    """

    @staticmethod
    def forward(ctx, shortcut: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.param_meta = [(p.shape, p.dtype, p.device) for p in params]
        # A fresh tensor: the block applies an in-place activation next, which autograd forbids on an
        # input returned as-is by a custom Function.
        return shortcut.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        zeros = tuple(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.param_meta)
        return (grad_output,) + zeros


class StochasticDepth(nn.Module):
    """Gate of one residual block: holds p_l, the gate granularity and the scaling rule.

    It has no parameters or buffers, so adding it to a block leaves the block's state dict unchanged.
    The model plans the gates of a mini-batch (:meth:`StochasticDepthMixin.plan_gates`); a block used on
    its own draws its gate when it runs.
    """

    def __init__(self, survival_prob: float = 1.0, gate: str = 'batch', rule: str = 'paper'):
        super().__init__()
        survival_prob = float(survival_prob)
        if not 0.0 <= survival_prob <= 1.0:
            raise ConfigError(f'survival probability must lie in [0, 1], got {survival_prob}')
        if gate not in GATES:
            raise ConfigError(f'unknown gate {gate!r}; choose one of {GATES}')
        if rule not in RULES:
            raise ConfigError(f'unknown scaling rule {rule!r}; choose one of {RULES}')
        if rule == 'inverted' and survival_prob == 0.0:
            raise ConfigError('the inverted rule divides by the survival probability, which must then be > 0')
        self.survival_prob = survival_prob
        self.gate = gate
        self.rule = rule
        self.generator: Optional[torch.Generator] = None
        # Set by the model for the next forward: a bool (batch gate) or a bool tensor [N] (sample gate).
        self.planned: Optional[Union[bool, torch.Tensor]] = None
        # With gradient checkpointing the block runs again in backward and must see the same gate.
        self.hold_plan = False
        self.num_calls = 0
        self.num_executed = 0

    def extra_repr(self) -> str:
        return f'survival_prob={self.survival_prob:.4f}, gate={self.gate}, rule={self.rule}'

    def draw(self, batch_size: int) -> Union[bool, torch.Tensor]:
        """One Bernoulli(p_l) draw for the batch gate, or a [batch_size] bool mask for the sample gate."""
        if self.gate == 'batch':
            return bool(torch.rand((), generator=self.generator) < self.survival_prob)
        return torch.rand(batch_size, generator=self.generator) < self.survival_prob

    def next_gate(self, batch_size: int) -> Union[bool, torch.Tensor]:
        keep = self.planned
        if keep is None:
            keep = self.draw(batch_size)
        elif not self.hold_plan:
            self.planned = None
        return keep

    def forward_train(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            branch: Callable[[torch.Tensor], torch.Tensor],
            branch_params: Callable[[], List[nn.Parameter]],
    ) -> torch.Tensor:
        """Training-mode ``shortcut + gate * f(x)`` (before the block's final activation)."""
        keep = self.next_gate(x.shape[0])
        self.num_calls += 1
        if isinstance(keep, bool):
            if not keep:
                return _SkippedBranch.apply(shortcut, *branch_params())
            self.num_executed += 1
            out = branch(x)
            return shortcut + out / self.survival_prob if self.rule == 'inverted' else shortcut + out
        # Per-sample gate: the branch runs for the whole batch and a mask zeroes the dropped samples.
        self.num_executed += 1
        out = branch(x)
        scale = keep.to(device=out.device, dtype=out.dtype)
        if self.rule == 'inverted':
            scale = scale / self.survival_prob
        return shortcut + out * scale.view((-1,) + (1,) * (out.ndim - 1))

    def forward(self, branch_out: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """Eval-mode ``shortcut + E[gate] * f(x)``: ``p_l f(x)`` for the paper rule, ``f(x)`` for inverted."""
        if self.rule == 'paper' and self.survival_prob != 1.0:
            return shortcut + branch_out * self.survival_prob
        return shortcut + branch_out


class ResidualGateMixin:
    """Forward pass of a residual block with a stochastic-depth gate.

    A block provides ``stochastic_depth`` (a :class:`StochasticDepth`), ``forward_shortcut``,
    ``forward_branch`` (the residual function f, ending in its last BatchNorm, :meth:`branch_norm`) and
    ``forward_output`` (:meth:`output_activation` after the sum, post-activation as in the paper).
    """
    # Submodules whose parameters are not part of the branch f.
    shortcut_modules = ('shortcut', 'downsample')

    def branch_norm(self) -> Optional[nn.Module]:
        """The norm layer whose output is the branch output (where p_l folds exactly), or None if none is."""
        raise NotImplementedError

    def output_activation(self) -> nn.Module:
        """The activation applied after the residual sum (what a pruned block keeps with its shortcut)."""
        raise NotImplementedError

    def zero_init_last(self) -> None:
        """Zero the scale of the branch's last norm, so that a fresh block starts as its shortcut."""
        norm = self.branch_norm()
        if norm is not None and getattr(norm, 'weight', None) is not None:
            nn.init.zeros_(norm.weight)

    def branch_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.split('.', 1)[0] not in self.shortcut_modules]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.forward_shortcut(x)
        if self.training and not torch.jit.is_scripting():
            out = self.stochastic_depth.forward_train(x, shortcut, self.forward_branch, self.branch_parameters)
        else:
            out = self.stochastic_depth(self.forward_branch(x), shortcut)
        return self.forward_output(out)


class StochasticDepthMixin:
    """Model-level stochastic depth: per-block probabilities, expected depth, gate planning and stats.

    Gates come from torch's CPU RNG, so ``torch.manual_seed`` makes runs repeatable;
    :meth:`set_gate_generator` draws them from a given ``torch.Generator`` instead (the trainer gives
    every DDP rank an identically seeded one so that all ranks skip the same blocks).
    """
    # Host-side bookkeeping that TorchScript need not (and cannot) compile.
    __jit_unused_properties__ = ['survival_probs', 'num_blocks', 'expected_depth', 'gate_generator', 'last_gates']

    def stochastic_depth_modules(self) -> List[StochasticDepth]:
        return [m for m in self.modules() if isinstance(m, StochasticDepth)]

    @property
    def survival_probs(self) -> List[float]:
        return [m.survival_prob for m in self.stochastic_depth_modules()]

    @property
    def num_blocks(self) -> int:
        return len(self.stochastic_depth_modules())

    @property
    def expected_depth(self) -> float:
        return expected_depth(self.survival_probs)

    def sd_config(self) -> Dict[str, object]:
        """The stochastic-depth settings as ``create_model`` keyword arguments, JSON-able.

        ``timm.create_model(name, **model.sd_config())`` builds this network again; the same dict is stored
        with trained weights (safetensors metadata, config.json ``model_args``, ONNX metadata).
        """
        args = dict(self._sd_args)
        if getattr(self, 'sd_keep_blocks', None) is not None:
            args['sd_keep_blocks'] = list(self.sd_keep_blocks)
        return args

    def set_gate_generator(self, generator: Optional[torch.Generator]) -> None:
        """Draw gates from ``generator`` (a CPU ``torch.Generator``), or from torch's global RNG if None."""
        check_gate_generator(generator)
        self._gate_generator = generator
        for m in self.stochastic_depth_modules():
            m.generator = generator

    @property
    def gate_generator(self) -> Optional[torch.Generator]:
        return getattr(self, '_gate_generator', None)

    def plan_gates(self, batch_size: int) -> None:
        """Draw every block's gate for the next training mini-batch in one call to the RNG."""
        modules = self.stochastic_depth_modules()
        if not modules:
            return
        probs = torch.tensor([m.survival_prob for m in modules], dtype=torch.float64)
        sample_gate = modules[0].gate == 'sample'
        shape = (len(modules), batch_size) if sample_gate else (len(modules),)
        keep = torch.rand(shape, generator=self.gate_generator, dtype=torch.float64) < (
            probs.view(-1, 1) if sample_gate else probs)
        plan = list(keep) if sample_gate else keep.tolist()
        for m, k in zip(modules, plan):
            m.planned = k
        self._last_gates = None if sample_gate else plan

    @property
    def last_gates(self) -> Optional[List[bool]]:
        """Batch gates planned for the most recent training forward (None before one, or with sample gates)."""
        return getattr(self, '_last_gates', None)

    def block_stats(self) -> Dict[str, int]:
        """Branch executions in training forwards since :meth:`reset_block_stats` (total = block calls)."""
        modules = self.stochastic_depth_modules()
        return dict(executed=sum(m.num_executed for m in modules), total=sum(m.num_calls for m in modules))

    def reset_block_stats(self) -> None:
        for m in self.stochastic_depth_modules():
            m.num_calls = m.num_executed = 0

    def _hold_gate_plans(self, enable: bool) -> None:
        for m in self.stochastic_depth_modules():
            m.hold_plan = enable

