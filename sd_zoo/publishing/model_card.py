"""Model cards of the Hub repos: one Jinja template (``templates/model_card.md``) filled from a training run.

:func:`render_card` turns the facts gathered by ``sd-zoo hub build`` into a ``huggingface_hub.ModelCard``
whose YAML front matter carries the Hub metadata (library, tags, datasets, ``model-index`` results) and an
``sd_zoo`` block (data, evaluation, weights sha256) that ``sd-zoo hub check`` verifies; the body is the
template. Numbers are percentages rounded to two decimals, in the YAML and in the text alike.
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..models.tags import HUB_ORG, LICENSE, PAPER_ID

TEMPLATE = Path(__file__).with_name('templates') / 'model_card.md'
TAGS = ('image-classification', 'timm', 'stochastic-depth')

# Huang et al. 2016, Table 1: test error (%) on the lossless datasets with standard augmentation.
PAPER_RESULTS = (
    dict(model='ResNet-110', data='CIFAR-10', constant=6.41, stochastic=5.25),
    dict(model='ResNet-110', data='CIFAR-100', constant=27.22, stochastic=24.98),
    dict(model='ResNet-1202', data='CIFAR-10', constant=6.67, stochastic=4.91),
)

BIBTEX = """@inproceedings{huang2016deep,
  title     = {Deep Networks with Stochastic Depth},
  author    = {Huang, Gao and Sun, Yu and Liu, Zhuang and Sedra, Daniel and Weinberger, Kilian Q.},
  booktitle = {European Conference on Computer Vision (ECCV)},
  pages     = {646--661},
  year      = {2016},
  publisher = {Springer},
  eprint    = {1603.09382},
  archivePrefix = {arXiv}
}"""

# Metrics in the model-index, in the order they appear: {type: (name, key of the evaluation dict)}.
METRICS = {
    'accuracy': ('Top-1 accuracy (%)', 'top1_acc'),
    'top1_error': ('Top-1 error (%)', 'top1_err'),
    'top5_error': ('Top-5 error (%)', 'top5_err'),
}


def round_pct(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(float(value), 2)


def render_card(facts: Dict[str, Any]):
    """The model card (``huggingface_hub.ModelCard``) of one Hub folder.

    ``facts`` holds what the template shows; ``sd-zoo hub build`` assembles it (see ``hub.gather_facts``).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    ev = facts['eval']
    eval_results = [EvalResult(
        task_type='image-classification', task_name='Image Classification',
        dataset_type=facts['dataset_hub_id'], dataset_name=facts['data_title'],
        dataset_config=facts['dataset_config'], dataset_split=ev['split'],
        metric_type=metric, metric_name=METRICS[metric][0], metric_value=value,
    ) for metric, value in expected_metrics(ev).items()]
    sd_zoo_block = dict(
        model=facts['arch'], tag=facts['tag'], data=facts['data'], weights_sha256=facts['sha256'],
        model_args=facts['sd'],
        eval=dict(split=ev['split'], num_images=ev['num_images'], limit=ev['limit'],
                  top1_err=round_pct(ev['top1_err']), top5_err=round_pct(ev['top5_err']),
                  measured_by=ev['measured_by']),
    )
    card_data = ModelCardData(
        library_name='timm', license=LICENSE, pipeline_tag='image-classification', tags=list(TAGS),
        datasets=[facts['dataset_hub_id']], metrics=['accuracy'], model_name=facts['name'],
        eval_results=eval_results, sd_zoo=sd_zoo_block,
    )
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATE), hub_org=HUB_ORG, paper_id=PAPER_ID, license=LICENSE,
        bibtex=BIBTEX, paper_rows=PAPER_RESULTS, **facts)


def read_card(path) -> Any:
    """A README.md as a ``huggingface_hub.ModelCard`` (YAML front matter parsed into ``card.data``)."""
    from huggingface_hub import ModelCard
    return ModelCard.load(Path(path))


def card_metrics(card) -> Dict[str, float]:
    """``{metric type: value}`` of the card's model-index results."""
    return {r.metric_type: float(r.metric_value) for r in (card.data.eval_results or [])}


def expected_metrics(evaluation: Dict[str, float]) -> Dict[str, float]:
    """The model-index values a card shows for an evaluation dict (top1_err, top5_err; no top-5 from a run's
    summary), in the order of :data:`METRICS`."""
    ev = dict(evaluation, top1_acc=100 - evaluation['top1_err'])
    return {metric: round_pct(ev[key]) for metric, (_, key) in METRICS.items() if ev.get(key) is not None}


def recipe_rows(config: Dict[str, Any], amp_recorded: bool = False) -> List[Tuple[str, Any]]:
    """The training settings worth showing, in a stable order, skipping unset ones.

    ``amp`` is shown where the run used what it records (``amp_recorded``: CUDA runs, and runs that recorded
    the precision they chose; the trainer of older CPU runs ignored ``amp`` there, so such a card must not
    claim it).
    """
    keys = ('model', 'data', 'recipe', 'epochs', 'batch_size', 'lr', 'schedule', 'milestones', 'gamma',
            'warmup_epochs', 'momentum', 'nesterov', 'weight_decay', 'decay_norm_and_bias', 'label_smoothing',
            'amp', 'drop_path_rate', 'sd_schedule', 'sd_gate', 'sd_rule', 'val_size', 'train_subset', 'seed')
    rows = []
    for key in keys:
        value = config.get(key)
        if value in (None, (), []) or key == 'amp' and not amp_recorded:
            continue
        if isinstance(value, (list, tuple)):
            value = ', '.join(str(v) for v in value)
        rows.append((key, f'`{value}`' if isinstance(value, str) else value))
    return rows
