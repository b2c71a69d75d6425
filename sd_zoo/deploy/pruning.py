"""Depth pruning: drop whole residual blocks of a trained stochastic-depth ResNet, without retraining.

Stochastic depth trains every block to be skipped now and then, so the trained net tolerates missing
blocks (the paper's "implicit ensemble of networks of different depths"). At test time block l computes
``act(shortcut(x) + p_l f_l(x))``; pruning it leaves :class:`ShortcutOnly`, ``act(shortcut(x))``: the
expected-value network with p_l = 0.

Blocks are named by their global indices (``sd_zoo.models.block_slots``); every stage keeps at least one
block. Which blocks go first:

* ``'survival'``: lowest survival probability p_l first, the paper's own ranking of how dispensable a
  block is; ties (equal p_l, as at constant depth) go to the later block first;
* ``'importance'``: each block dropped alone once and scored on validation images held out of the
  training split (never the test split); least harmful first;
* an explicit list of block indices, dropped in that order.

:func:`prune_blocks` returns a pruned copy (``block_slots.apply_keep_blocks`` prunes in place).
"""
from copy import deepcopy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import DATASETS, normalize, split_part
from ..errors import ConfigError
from ..evaluation.evaluate import check_model_fits
from ..models.tags import TAGS, normalization
from ..models.block_slots import ShortcutOnly, apply_keep_blocks, block_slots, check_indices

ORDERS = ('survival', 'importance')
# Validation images scored per block for the importance order: enough to rank 9-54 blocks, seconds on a CPU.
IMPORTANCE_IMAGES = 500

Order = Union[str, Sequence[int]]


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
    return check_indices(list(order), block_slots(model), 'prune order')


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
