"""Depth pruning: drop whole residual blocks of a trained stochastic-depth ResNet, without retraining.

Stochastic depth trains every block to be skipped now and then, so the trained net tolerates missing
blocks (the paper's "implicit ensemble of networks of different depths"). At test time block l computes
``act(shortcut(x) + p_l f_l(x))``; pruning it leaves :class:`ShortcutOnly`, ``act(shortcut(x))``: the
expected-value network with p_l = 0.

Blocks are named by 0-based global indices over all residual blocks in forward order (``layer1.0`` is
0); indices stay valid after pruning, because a pruned block keeps its place in its stage. Every stage
keeps at least one block. Which blocks go first:

* ``'survival'``: lowest survival probability p_l first, the paper's own ranking of how dispensable a
  block is; ties (equal p_l, as at constant depth) go to the later block first;
* ``'importance'``: each block dropped alone once and scored on validation images held out of the
  training split (never the test split); least harmful first;
* an explicit list of block indices, dropped in that order.

:func:`prune_blocks` returns a pruned copy; :func:`apply_keep_blocks` prunes in place (what
``create_model(..., sd_keep_blocks=[...])`` calls, so a pruned model rebuilds from its saved weights).
"""
import argparse
from copy import deepcopy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import DATASETS, normalize, split_part
from ..errors import ConfigError
from ..evaluation.evaluate import check_model_fits, normalization
from ..weights.pretrained import TAGS
from ..models.stochastic_depth import StochasticDepth

ORDERS = ('survival', 'importance')
# Validation images scored per block for the importance order: enough to rank 9-54 blocks, seconds on a CPU.
IMPORTANCE_IMAGES = 500

Order = Union[str, Sequence[int]]


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


def _check_indices(indices: Sequence[int], slots: List[BlockSlot], what: str) -> List[int]:
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
    keep = sorted(_check_indices(keep, slots, 'sd_keep_blocks'))
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


def parse_order(value: str) -> Order:
    """Command-line prune order: ``survival``, ``importance``, or comma-separated block indices."""
    if value in ORDERS:
        return value
    try:
        return [int(i) for i in value.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'expected {" or ".join(ORDERS)} or comma-separated block indices, got {value!r}') from None


def survival_ranking(model: nn.Module) -> List[int]:
    """Kept blocks, lowest survival probability first; equal probabilities: the later block first."""
    kept = [b for b in block_slots(model) if b.kept]
    return [b.index for b in sorted(kept, key=lambda b: (b.module.stochastic_depth.survival_prob, -b.index))]


def drop_ranking(model: nn.Module, order: Order = 'survival', data: Optional[str] = None, **importance_kw) -> List[int]:
    """Kept blocks in the order they are dropped: ``order`` is ``'survival'``, ``'importance'`` or a list."""
    if isinstance(order, str):
        if order == 'survival':
            return survival_ranking(model)
        if order == 'importance':
            return importance_ranking(model, data, **importance_kw)[0]
        raise ConfigError(f'unknown prune order {order!r}; choose one of {ORDERS} or give a list of block indices')
    return _check_indices(list(order), block_slots(model), 'prune order')


def blocks_to_keep(model: nn.Module, keep: int, ranking: Sequence[int]) -> List[int]:
    """The ``keep`` blocks left after dropping blocks in ``ranking`` order, never emptying a stage.

    A block whose stage has no other kept block is passed over, so a nested family of nets comes from
    one ranking: the blocks kept at N include those kept at N - 1.
    """
    slots, num_stages = block_slots(model), len(model._stages())
    left = {b.index for b in slots if b.kept}
    if isinstance(keep, bool) or not num_stages <= keep <= len(left):
        raise ConfigError(f'keep={keep}: this model has {len(left)} residual blocks in {num_stages} stages; keep '
                          f'between {num_stages} (one per stage) and {len(left)} blocks')
    per_stage = np.bincount([slots[i].stage for i in left], minlength=num_stages)
    for i in ranking:
        if len(left) == keep:
            break
        if per_stage[slots[i].stage] > 1:
            left.discard(i)
            per_stage[slots[i].stage] -= 1
    if len(left) > keep:
        raise ConfigError(f'the prune order {list(ranking)} names too few blocks to keep only {keep}; '
                          f'list more blocks (none may be the last of its stage)')
    return sorted(left)


def prune_blocks(model: nn.Module, keep: Union[int, Sequence[int]], order: Order = 'survival',
                 data: Optional[str] = None, **importance_kw) -> nn.Module:
    """A copy of ``model`` keeping ``keep`` residual blocks (a count, or the list of block indices).

    With a count, blocks are dropped in ``order`` (see the module doc; ``'importance'`` ranks them on
    validation images of ``data``, keyword options as :func:`importance_ranking`). ``model`` itself is not
    modified; the copy reports its kept blocks in ``sd_keep_blocks``.
    """
    if isinstance(keep, (int, np.integer)) and not isinstance(keep, bool):
        keep = blocks_to_keep(model, int(keep), drop_ranking(model, order, data, **importance_kw))
    elif isinstance(keep, bool) or not isinstance(keep, Sequence):
        raise ConfigError(f'keep must be a number of blocks or a list of block indices, got {keep!r}')
    return apply_keep_blocks(deepcopy(model), keep)


# --- Importance: each block dropped alone, scored on held-out training images ------------------------

def validation_images(data_name: str, num_images: int = IMPORTANCE_IMAGES):
    """The first ``num_images`` (class-balanced) of the validation images held out of the training split."""
    return split_part(data_name, 'val', num_images, what='importance images')


def training_data(model: nn.Module) -> Optional[str]:
    """The sd-zoo dataset the model's weights were trained on, if its cfg says (a weights file or a tag)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    # A fresh model carries its architecture's default tag too; only loaded weights have a source.
    tag_data = getattr(TAGS.get(cfg.get('tag')), 'data', None) if cfg.get('source') else None
    name = cfg.get('data') or tag_data
    return name if name in DATASETS else None


@torch.no_grad()
def _val_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Dict[str, float]:
    """Top-1 error (%) and mean cross-entropy of an eval-mode model on normalised images."""
    logits = torch.cat([model(chunk) for chunk in x.split(batch_size)])
    return dict(top1_err=100.0 * float((logits.argmax(1) != y).double().mean()), loss=float(F.cross_entropy(logits, y)))


def importance_ranking(model: nn.Module, data: Optional[str], num_images: int = IMPORTANCE_IMAGES,
                       batch_size: int = 250, progress: bool = True) -> Tuple[List[int], Dict[int, Dict[str, float]]]:
    """Kept blocks, least harmful to drop first, and each one's validation scores when dropped alone.

    Each kept block is pruned alone, once, and the net scored on ``num_images`` validation images of
    ``data`` (default: :func:`training_data`). The harm is the validation top-1 error; the cross-entropy
    breaks ties, then the later block goes first. Returns ``(ranking, {block: {'top1_err': %, 'loss': ce}})``;
    the key ``-1`` holds the unpruned net.
    """
    from tqdm.auto import tqdm

    data = data or training_data(model)
    if not data:
        raise ConfigError('the importance order scores blocks on validation images, and this model does not say '
                          'what it was trained on: name the training data (data="cifar10-jpeg75", or '
                          '--calibration DATA on the command line)')
    check_model_fits(model, data)
    images, labels = validation_images(data, num_images)
    work = deepcopy(model).eval()
    device = next(work.parameters()).device
    x = normalize(torch.as_tensor(images), *normalization(model)).to(device)
    y = torch.as_tensor(labels).to(device)
    stages = work._stages()
    scores = {-1: _val_scores(work, x, y, batch_size)}
    kept = [b for b in block_slots(work) if b.kept]
    for b in tqdm(kept, desc='importance', unit='block', disable=not progress):
        stages[b.stage][b.position] = ShortcutOnly(b.module)
        scores[b.index] = _val_scores(work, x, y, batch_size)
        stages[b.stage][b.position] = b.module
    ranking = sorted((b.index for b in kept), key=lambda i: (scores[i]['top1_err'], scores[i]['loss'], -i))
    return ranking, scores
