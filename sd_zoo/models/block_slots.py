"""Residual block positions of a network, and pruning it in place to some of them (``sd_keep_blocks``).

Blocks are named by 0-based global indices over all residual blocks in forward order (``layer1.0`` is
0); indices stay valid after pruning, because a pruned block keeps its place in its stage as a
:class:`ShortcutOnly`. ``create_model(..., sd_keep_blocks=[...])`` calls :func:`apply_keep_blocks`, so a
pruned model rebuilds from its saved weights; which blocks to drop is ``sd_zoo.deploy.pruning``'s concern.
"""
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from .stochastic_depth import StochasticDepth


class ShortcutOnly(nn.Module):
    """A residual block without its branch: ``act(shortcut(x))``.

    It keeps the block's shortcut module under the block's own attribute name (``shortcut`` for CIFAR
    blocks, ``downsample`` for bottlenecks; the other is None), so kept parameters keep their state-dict
    keys and ONNX export converts a CIFAR transition shortcut to a convolution as for a full block. In a
    post-activation ReLU net its input is already non-negative, so a non-transition block is the identity.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.shortcut = getattr(block, 'shortcut', None)
        self.downsample = getattr(block, 'downsample', None)
        self.act = block.output_activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is not None:
            x = self.shortcut(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return self.act(x)


@dataclass
class BlockSlot:
    """One residual block position: global index, stage, index in the stage, and what sits there now."""
    index: int
    stage: int
    position: int
    module: nn.Module

    @property
    def kept(self) -> bool:
        return not isinstance(self.module, ShortcutOnly)


def block_slots(model: nn.Module) -> List[BlockSlot]:
    """Every residual block position of ``model`` in forward order, pruned ones included."""
    stages = getattr(model, '_stages', None)
    if stages is None:
        raise ConfigError(f'{type(model).__name__} is not an sd-zoo ResNet; depth pruning needs one')
    slots = []
    for s, stage in enumerate(stages()):
        for i, module in enumerate(stage):
            if not isinstance(module, ShortcutOnly) and not isinstance(getattr(module, 'stochastic_depth', None),
                                                                       StochasticDepth):
                raise ConfigError(f'layer{s + 1}.{i} ({type(module).__name__}) is not a gated residual block')
            slots.append(BlockSlot(len(slots), s, i, module))
    return slots


def kept_blocks(model: nn.Module) -> List[int]:
    """Global indices of the blocks that still compute their branch."""
    return [b.index for b in block_slots(model) if b.kept]


def check_indices(indices: Sequence[int], slots: List[BlockSlot], what: str) -> List[int]:
    checked = []
    for i in indices:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise ConfigError(f'{what}: block indices are integers, got {i!r}')
        if not 0 <= i < len(slots):
            raise ConfigError(f'{what}: block index {int(i)} is out of range; this net has {len(slots)} residual '
                              f'blocks, numbered 0 to {len(slots) - 1} in forward order')
        if not slots[i].kept:
            raise ConfigError(f'{what}: block {int(i)} was already pruned from this model; '
                              f'its kept blocks are {[b.index for b in slots if b.kept]}')
        checked.append(int(i))
    if len(set(checked)) != len(checked):
        raise ConfigError(f'{what}: block indices repeat in {checked}; give each block once')
    return checked


def apply_keep_blocks(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Prune ``model`` in place to the blocks ``keep`` (global indices); every stage must keep one.

    Sets ``model.sd_keep_blocks`` (sorted), which ``model.sd_config()`` reports, so the list travels with
    saved weights and in ONNX metadata. Returns the model.
    """
    if isinstance(keep, (str, bytes)) or not isinstance(keep, Sequence):
        raise ConfigError(f'sd_keep_blocks must be a list of block indices, got {keep!r}')
    slots = block_slots(model)
    keep = sorted(check_indices(keep, slots, 'sd_keep_blocks'))
    stages = model._stages()
    for s in range(len(stages)):
        if not any(slots[i].stage == s for i in keep):
            blocks = [b.index for b in slots if b.stage == s]
            raise ConfigError(f'sd_keep_blocks {keep} leaves stage {s + 1} (blocks {blocks[0]} to {blocks[-1]}) '
                              f'empty; keep at least one block of every stage')
    for slot in slots:
        if slot.kept and slot.index not in keep:
            stages[slot.stage][slot.position] = ShortcutOnly(slot.module)
    model.sd_keep_blocks = keep
    return model
