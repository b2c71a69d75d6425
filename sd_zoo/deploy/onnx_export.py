"""`sd-zoo export`: a stochastic-depth ResNet's expected-value network as a clean ONNX graph.

At test time block l computes ``act(shortcut + p_l * f_l(x))`` (paper rule), or ``act(shortcut + f_l(x))``
(inverted rule, where training already divided by p_l). f_l ends in a BatchNorm, affine in eval mode, so
folding p_l into its gamma and beta is exact and leaves the operators of a plain ResNet of the same depth,
no Mul and nothing random. The CIFAR nets' parameter-free transition shortcuts become equivalent 1x1
strided convs (:func:`shortcuts_as_convs`), so a CIFAR graph is Conv, Relu, Add and a head.

:func:`export_onnx` exports an eval-mode deep copy (the caller's model is never modified) with
``torch.onnx.export(dynamo=True)``, or TorchScript when that fails (``exporter=`` picks one), then checks
the file before it replaces the output: no random operator, ``onnx.checker`` full check, and ONNX Runtime
against PyTorch eval on a probe batch (within ``FP32_RTOL`` of the logit scale for fp32; for fp16, no
weight or probe activation beyond float16's range and finite outputs).
"""
import io
import os
import warnings
from collections import Counter
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ExportError
from ..files import atomic_write, set_onnx_metadata
from .onnx_runtime import OnnxClassifier, import_onnxruntime
from .pruning import prune_blocks
from ..weights.loader import Provenance
from ..models.stochastic_depth import StochasticDepth

# Operators that would make the exported network stochastic; the export fails if any appears.
RANDOM_OPS = frozenset({
    'RandomUniform', 'RandomUniformLike', 'RandomNormal', 'RandomNormalLike', 'Bernoulli', 'Dropout', 'Multinomial',
})
EXPORTERS = ('auto', 'dynamo', 'torchscript')
# The dynamo exporter emits opset 18 and up (asked for less, it silently keeps 18); ORT >= 1.14 runs it.
MIN_OPSET = 18
TORCHSCRIPT_MAX_OPSET = 20
INPUT_NAME, OUTPUT_NAME = 'input', 'logits'
# fp32 parity: max |ORT - PyTorch| must stay within this fraction of max(1, max |logit|).
FP32_RTOL = 1e-4
PROBE_BATCH = 4
# A protobuf cannot exceed 2 GiB; every sd-zoo model is far below (ResNet-1202: 78 MB).
MAX_SINGLE_FILE_BYTES = 2 ** 31 - 2 ** 20
_STOCK_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def fold_survival_probs(model: nn.Module) -> Tuple[int, List[str]]:
    """Fold each paper-rule p_l < 1 into gamma and beta of its branch's last norm, in place, and open every gate.

    Inverted-rule gates are already identities in eval. Returns the number of folded blocks and the names
    of blocks that could not be folded (they keep their multiplication by p_l, with a warning).
    """
    folded, kept = 0, []
    with torch.no_grad():
        for name, block in model.named_modules():
            gate = getattr(block, 'stochastic_depth', None)
            if not isinstance(gate, StochasticDepth):
                continue
            if gate.rule == 'paper' and gate.survival_prob != 1.0:
                # Exact only for a stock torch norm with affine weight and bias as the branch's output.
                norm = block.branch_norm()
                if not (isinstance(norm, _STOCK_NORMS) and type(norm).__module__.startswith('torch.nn')
                        and norm.weight is not None and norm.bias is not None):
                    kept.append(name)
                    continue
                norm.weight.mul_(gate.survival_prob)
                norm.bias.mul_(gate.survival_prob)
                folded += 1
            gate.survival_prob = 1.0
    if kept:
        warnings.warn(
            f'{len(kept)} blocks ({", ".join(kept[:4])}{", ..." if len(kept) > 4 else ""}) cannot fold their '
            f'survival probability into a norm layer and keep a Mul in the exported graph')
    return folded, kept


def _eval_copy(model: nn.Module) -> nn.Module:
    return deepcopy(model).eval().float().cpu()


def shortcuts_as_convs(model: nn.Module) -> int:
    """Replace each parameter-free transition shortcut (subsample + zero channel padding) by its ``as_conv()``.

    The conv computes exactly the same tensor. ONNX Runtime's CPU provider runs convolutions in a blocked
    channel layout (NCHWc); a Pad along channels forces a round trip to NCHW that then persists through the
    whole stage and keeps every residual Add and ReLU from fusing into its conv. As a conv, the graph stays
    blocked end to end (measured about 7% faster for sd_resnet110). Returns the number of shortcuts replaced.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if hasattr(child, 'as_conv'):
                setattr(parent, name, child.as_conv().to(next(model.parameters())))
                replaced += 1
    return replaced


def expected_value_model(model: nn.Module) -> nn.Module:
    """An eval-mode float32 CPU deep copy of ``model`` with the survival probabilities folded in."""
    copy = _eval_copy(model)
    fold_survival_probs(copy)
    return copy


def _all_nodes(graph):
    """Nodes of a graph and of every subgraph (If / Loop bodies) inside it."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField('g') else []):
                yield from _all_nodes(sub)


def op_histogram(proto) -> Dict[str, int]:
    """Operator type -> count over the main graph, its subgraphs and its local functions."""
    counts = Counter(n.op_type for n in _all_nodes(proto.graph))
    for fn in proto.functions:
        counts.update(n.op_type for n in fn.node)
    return dict(sorted(counts.items()))


def check_no_random_ops(proto) -> None:
    """Raise :class:`ExportError` if the graph holds any operator that samples or drops at random."""
    found = sorted(set(op_histogram(proto)) & RANDOM_OPS)
    if found:
        raise ExportError(
            f'the exported graph contains random operators ({", ".join(found)}); the expected-value network '
            f'must be deterministic. Was the model exported in training mode, or does it use dropout layers '
            f'that eval mode does not disable?')


def _display_name(model: nn.Module) -> str:
    # The architecture only: a module's default-cfg tag says nothing about the weights it holds.
    return (getattr(model, 'pretrained_cfg', {}) or {}).get('architecture', type(model).__name__)


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how the file checked out."""
    path: str
    model: str                   # names the weights as sd_zoo.weights.loader.Provenance does, with source and sha256
    source: str
    weights_sha256: Optional[str]
    exporter: str
    opset: int
    precision: str
    batch: str
    size_bytes: int
    folded_blocks: int
    unfolded_blocks: List[str]
    op_counts: Dict[str, int]
    probe_batch: int
    logit_scale: float           # max |logit| of PyTorch on the probe batch
    max_abs_diff: float          # max |ORT - PyTorch eval| on the probe batch
    tolerance: Optional[float]   # fp32 only: FP32_RTOL * max(1, logit_scale)
    top1_agreement: float        # ORT vs PyTorch argmax on the probe batch
    metadata: Dict[str, str]

    def summary(self) -> str:
        ops = ', '.join(f'{k} {v}' for k, v in self.op_counts.items())
        kept = f'; {len(self.unfolded_blocks)} blocks keep a Mul' if self.unfolded_blocks else ''
        check = (f'max |ORT - PyTorch| {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}, logit scale '
                 f'{self.logit_scale:.3g})' if self.tolerance is not None else
                 f'max |ORT fp16 - PyTorch fp32| {self.max_abs_diff:.3g} (logit scale {self.logit_scale:.3g}), '
                 f'top-1 agreement {100 * self.top1_agreement:.1f}% on {self.probe_batch} random inputs')
        weights = Provenance(self.model, self.source, self.weights_sha256)
        return (f'wrote {self.path} ({self.size_bytes / 2 ** 20:.1f} MiB): {weights}, {self.precision}, '
                f'opset {self.opset}, batch {self.batch}, {self.exporter} exporter\n'
                f'  survival probabilities folded in {self.folded_blocks} blocks{kept}\n'
                f'  operators: {ops}\n'
                f'  check: {check}')


def _check_opset(opset: int, exporter: str) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise ConfigError(
            f'opset {opset} is too old: the minimum is {MIN_OPSET} (what torch.onnx emits natively; '
            f'ONNX Runtime runs it from 1.14 on)')
    if opset > newest:
        raise ConfigError(f'opset {opset} is newer than this onnx package knows ({newest})')
    if exporter == 'torchscript' and opset > TORCHSCRIPT_MAX_OPSET:
        raise ConfigError(f'the TorchScript exporter supports opsets up to {TORCHSCRIPT_MAX_OPSET}, not {opset}')


def _check_writable(output: Path) -> None:
    """Fail before the (slow) export when ``output`` cannot be written."""
    if output.is_dir():
        raise ExportError(f'output {output} is a directory; give a file name such as {output / "model.onnx"}')
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f'cannot write {output}: {e.strerror or e}') from e
    if not os.access(output.parent, os.W_OK):
        raise ExportError(f'cannot write {output}: {output.parent} is not writable; choose another -o/--output')


def _trace(model: nn.Module, example: torch.Tensor, opset: int, dynamic_batch: bool, exporter: str):
    """The ONNX ModelProto of ``model`` and the name of the exporter that produced it."""
    import onnx

    names = dict(opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    if exporter in ('auto', 'dynamo'):
        try:
            shapes = ({0: torch.export.Dim('batch', min=1)},) if dynamic_batch else None
            program = torch.onnx.export(
                model, (example,), None, dynamo=True, dynamic_shapes=shapes, optimize=True, verbose=False, **names)
            return program.model_proto, 'dynamo'
        except Exception as e:  # torch.export raises many error types for unsupported code
            if exporter == 'dynamo' or opset > TORCHSCRIPT_MAX_OPSET:
                raise ExportError(f'torch.onnx dynamo export failed: {type(e).__name__}: {e}') from e
            warnings.warn(f'dynamo export failed ({type(e).__name__}: {e}); using the TorchScript exporter')
    buf = io.BytesIO()
    axes = {INPUT_NAME: {0: 'batch'}, OUTPUT_NAME: {0: 'batch'}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', category=DeprecationWarning)
            warnings.filterwarnings('ignore', message='.*legacy TorchScript-based ONNX export.*')
            warnings.filterwarnings('ignore', message='Constant folding - Only steps=1')
            torch.onnx.export(
                model, (example,), buf, dynamo=False, dynamic_axes=axes, do_constant_folding=True, **names)
        return onnx.load_from_string(buf.getvalue()), 'torchscript'
    except Exception as e:
        raise ExportError(f'torch.onnx TorchScript export failed: {type(e).__name__}: {e}') from e


def convert_to_fp16(proto):
    """float16 weights and compute with float32 input and output (Casts at both ends)."""
    import onnxscript.ir as ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # The converter appends its input and output Casts after the other nodes; ONNX wants a sorted graph.
    model = ir.from_proto(convert_float_to_float16(proto, keep_io_types=True))
    model.graph.sort()
    return ir.to_proto(model)


def check_fp16_range(proto, example: np.ndarray) -> None:
    """Raise :class:`ExportError` if a weight, or an activation on ``example``, is beyond float16's range.

    Checked on the fp32 graph with every intermediate exposed as an output: an ORT CPU session may run
    float16 nodes in float32 between inserted Casts, so the fp16 graph's own output would not show an
    overflow that a GPU would hit.
    """
    import onnx
    from onnx import numpy_helper
    ort = import_onnxruntime()

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for node in probe.graph.node for n in node.output
                              if n and n not in known)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node's output
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=['CPUExecutionProvider'])
    names = [o.name for o in session.get_outputs()]
    activations = zip(names, session.run(names, {session.get_inputs()[0].name: example}))
    weights = ((t.name, numpy_helper.to_array(t)) for t in proto.graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT)
    fp16_max = float(np.finfo(np.float16).max)
    for kind, arrays in (('weight', weights), ('activation', activations)):
        peak, name = max(((float(np.abs(v).max(initial=0.0)), n) for n, v in arrays
                          if np.issubdtype(np.asarray(v).dtype, np.floating)), default=(0.0, ''))
        if not peak <= fp16_max:
            raise ExportError(
                f'float16 would overflow: {kind} {name!r} reaches {peak:.3g} on a probe batch, beyond float16\'s '
                f'{fp16_max:.0f}; export this model in fp32')


def _probe(path: str, reference: np.ndarray, example: np.ndarray, fp16: bool) -> Dict[str, float]:
    """Run the written file on the probe batch and compare it with the PyTorch logits."""
    out = OnnxClassifier(path, threads=1)(example)
    if not np.isfinite(out).all():
        raise ExportError(f'the {"fp16" if fp16 else "fp32"} graph gives non-finite logits on a probe batch')
    scale = float(np.abs(reference).max())
    diff = float(np.abs(out - reference).max())
    tol = None if fp16 else FP32_RTOL * max(1.0, scale)
    if tol is not None and diff > tol:
        raise ExportError(
            f'ONNX Runtime and PyTorch disagree on a probe batch: max abs difference {diff:.3g} exceeds '
            f'{tol:.3g} ({FP32_RTOL:g} of the logit scale {scale:.3g})')
    agree = float((out.argmax(1) == reference.argmax(1)).mean())
    return dict(max_abs_diff=diff, logit_scale=scale, tolerance=tol, top1_agreement=agree)


def build_model(model_name: Optional[str] = None, pretrained: bool = False,
                checkpoint: Optional[Union[str, os.PathLike]] = None,
                model_args: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model to export (through :func:`sd_zoo.weights.loader.load_named`) and what names its weights: ``model``,
    ``source`` (the checkpoint's file name, 'pretrained' or 'random initialisation') and ``weights_sha256``."""
    from timm.models import split_model_name_tag

    from ..weights.loader import load_named

    model_args = model_args or {}
    if checkpoint is not None:
        if pretrained:
            raise ConfigError('give either pretrained weights or a checkpoint, not both')
        model, named = load_named(checkpoint, model_name=model_name, **model_args)
        source = Path(checkpoint).name  # not the whole path: the file travels to other machines
    else:
        if not model_name:
            raise ConfigError('name the model to export (--model NAME[.TAG]) or give a checkpoint')
        arch, tag = split_model_name_tag(model_name)
        if tag and not pretrained:
            raise ConfigError(f'{model_name} names published weights: add --pretrained to export them, or name '
                              f'the bare architecture {arch} to export random weights')
        model, named = load_named(model_name, pretrained=pretrained, **model_args)
        source = 'pretrained' if pretrained else named.weights
    return model, dict(model=named.model, source=source, weights_sha256=named.sha256)


def _resolve_model(model, pretrained, checkpoint, model_args, mean, std):
    """The module to export and the facts for its metadata, from a name, a checkpoint or a module."""
    from ..models.tags import normalization

    if isinstance(model, nn.Module):
        if pretrained or checkpoint is not None or model_args:
            raise ConfigError(
                'pretrained, checkpoint and model_args apply to a model name; build the module with the '
                'settings you want (timm.create_model(..., drop_path_rate=R)) and pass it alone')
        facts = dict(model=_display_name(model), source='module', weights_sha256=None)
    else:
        model, facts = build_model(model, pretrained, checkpoint, model_args)
    default_mean, default_std = normalization(model)
    facts['mean'] = [float(v) for v in (mean if mean is not None else default_mean)]
    facts['std'] = [float(v) for v in (std if std is not None else default_std)]
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if weight_bytes > MAX_SINGLE_FILE_BYTES:
        raise ExportError(f'{facts["model"]} holds {weight_bytes / 2 ** 30:.1f} GiB of weights, over the 2 GiB '
                          f'limit of a single ONNX file; sd-zoo exports single files only')
    return model, facts


def _metadata(model: nn.Module, facts: Dict[str, Any], input_size, fp16: bool, exporter: str) -> Dict[str, Any]:
    import sd_zoo

    rules = {m.rule for m in model.modules() if isinstance(m, StochasticDepth)}
    return dict(
        model=facts['model'], num_classes=int(model.num_classes), in_chans=int(input_size[0]),
        input_size=[int(d) for d in input_size], mean=facts['mean'], std=facts['std'],
        # The settings the weights were built with; the graph holds their expected value.
        model_args=model.sd_config() if hasattr(model, 'sd_config') else None,
        expected_value=('identity gates (inverted rule)' if rules == {'inverted'} else
                        'survival probability p_l folded into the last norm of each residual branch'),
        precision='fp16' if fp16 else 'fp32', source=facts['source'],
        **({'weights_sha256': facts['weights_sha256']} if facts['weights_sha256'] else {}),
        exporter=f'torch {torch.__version__} ({exporter})', version=sd_zoo.__version__,
        input=f'{INPUT_NAME}: float32 (N, C, H, W), RGB scaled to [0, 1] then (x - mean) / std',
        output=f'{OUTPUT_NAME}: float32 (N, num_classes)',
    )


def export_onnx(
        model: Union[str, nn.Module, None],
        output: Union[str, os.PathLike],
        *,
        pretrained: bool = False,
        checkpoint: Optional[Union[str, os.PathLike]] = None,
        model_args: Optional[Dict[str, Any]] = None,
        opset: int = MIN_OPSET,
        fp16: bool = False,
        batch: Union[str, int] = 'dynamic',
        exporter: str = 'auto',
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        keep_blocks: Union[None, int, Sequence[int]] = None,
        prune_order: Union[str, Sequence[int]] = 'survival',
        prune_data: Optional[str] = None,
) -> ExportReport:
    """Export the expected-value network of a stochastic-depth model to one .onnx file.

    Args:
        model: a registered name (``'sd_resnet110'``, ``'sd_resnet110.c10j75'``), an ``nn.Module``, or
            None with ``checkpoint`` (whose metadata names the architecture).
        output: the .onnx file to write; replaced only once the new file has passed its checks.
        pretrained: load the tag's published weights (name only).
        checkpoint: a safetensors file written by sd-zoo; its stochastic-depth settings are folded.
        model_args: ``create_model`` arguments overriding the settings of a name or checkpoint
            (``dict(drop_path_rate=0.2)``, ``dict(sd_probs=[...])``).
        opset: ONNX opset, ``MIN_OPSET`` or newer.
        fp16: float16 weights and compute, float32 input and logits.
        batch: ``'dynamic'`` or a fixed batch size.
        exporter: ``'auto'`` (dynamo, TorchScript if that fails), ``'dynamo'`` or ``'torchscript'``.
        mean, std: normalisation recorded in the metadata (default: the training data's or the cfg's).
        keep_blocks, prune_order, prune_data: export the net depth-pruned to ``keep_blocks`` residual blocks
            (a count, or a list of block indices), as :func:`sd_zoo.prune_blocks` with that order and data.
    """
    import onnx

    if exporter not in EXPORTERS:
        raise ConfigError(f'unknown exporter {exporter!r}; choose one of {EXPORTERS}')
    _check_opset(opset, exporter)
    dynamic_batch = batch == 'dynamic'
    if not dynamic_batch and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise ConfigError(f'batch must be "dynamic" or a positive integer, got {batch!r}')
    model, facts = _resolve_model(model, pretrained, checkpoint, model_args, mean, std)
    if keep_blocks is not None:
        model = prune_blocks(model, keep_blocks, prune_order, prune_data)

    in_chans = getattr(model, 'in_chans', 3)
    input_size = (in_chans,) + tuple((getattr(model, 'pretrained_cfg', {}) or {}).get('input_size', (3, 32, 32)))[-2:]
    probe_n = PROBE_BATCH if dynamic_batch else batch
    example = torch.randn((probe_n,) + input_size, generator=torch.Generator().manual_seed(0))
    export_model = _eval_copy(model)
    with torch.no_grad():
        # Logits of the unfolded eval network, so that the parity check covers the folding too.
        reference = export_model(example).numpy()
    folded, unfolded = fold_survival_probs(export_model)
    shortcuts_as_convs(export_model)

    output = Path(output)
    _check_writable(output)
    proto, used = _trace(export_model, example, opset, dynamic_batch, exporter)
    got_opset = next((o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')), None)
    if got_opset != opset:
        raise ExportError(f'asked for opset {opset} but the {used} exporter produced opset {got_opset}')
    check_no_random_ops(proto)
    if fp16:
        check_fp16_range(proto, example.numpy())
        proto = convert_to_fp16(proto)
    metadata = set_onnx_metadata(proto, _metadata(model, facts, input_size, fp16, used))
    proto.doc_string = f'{facts["model"]}: expected-value network of a stochastic-depth ResNet (sd-zoo)'
    check = {}

    def write_and_check(tmp: Path) -> None:
        # The file replaces ``output`` only once it has passed every check.
        onnx.save(proto, tmp)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f'the exported graph fails onnx.checker: {e}') from e
        check.update(_probe(str(tmp), reference, example.numpy(), fp16))
    atomic_write(output, write_and_check)
    return ExportReport(
        path=str(output), model=facts['model'], source=facts['source'], weights_sha256=facts['weights_sha256'],
        exporter=used, opset=opset, precision='fp16' if fp16 else 'fp32',
        batch='dynamic' if dynamic_batch else str(batch), size_bytes=output.stat().st_size,
        folded_blocks=folded, unfolded_blocks=unfolded, op_counts=op_histogram(proto), probe_batch=probe_n,
        metadata=metadata, **check)
