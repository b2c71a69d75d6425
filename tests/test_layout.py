"""The package's layout: imports run one way (models at the bottom, the command line at the top), with no circle.

Read from the source with ``ast``, so that an import inside a function counts as much as one at the top:
a lazy import hides a circle from Python, not from a reader.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / 'sd_zoo'


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The sd_zoo modules ``name`` imports, anywhere in its source."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ''
            # `from . import data` names a module; `from .errors import ConfigError` names a module's attribute
            targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle of ``graph`` (a package's ``__init__`` re-exporting its modules is no circle), or []."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def edges(node):
        # A module's edge to its own package's __init__ is Python's import of the parent, not a dependency.
        return [t for t in graph[node] if not node.startswith(t + '.')]

    def visit(node) -> List[str]:
        state[node] = 1
        stack.append(node)
        for target in edges(node):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in graph:
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_import_graph_has_no_circle():
    assert _cycle(_graph()) == []


def test_the_folders_import_one_way():
    """Folder by folder too: models at the bottom, then weights, training and evaluation, deploy, publishing,
    and the command line on top (the package's own __init__, which re-exports, aside)."""
    folders = {}
    for module, targets in _graph().items():
        if module == 'sd_zoo':
            continue
        source = module.split('.')[1]
        folders.setdefault(source, set()).update(t.split('.')[1] for t in targets if t != 'sd_zoo')
    folders = {f: targets - {f} for f, targets in folders.items()}
    assert _cycle(folders) == [], folders
    assert folders['models'] <= {'errors'} and 'cli' not in set().union(*(folders[f] for f in folders if f != 'cli'))


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert _cycle({'p': {'p.x'}, 'p.x': {'p'}}) == []  # a package re-exporting its module


def test_models_import_nothing_of_sd_zoo_but_their_error_types():
    graph = _graph()
    models = [name for name in graph if name == 'sd_zoo.models' or name.startswith('sd_zoo.models.')]
    assert len(models) >= 4
    outside = {f'{m} -> {t}' for m in models for t in graph[m]
               if not (t == 'sd_zoo.models' or t.startswith('sd_zoo.models.') or t in ('sd_zoo', 'sd_zoo.errors'))}
    assert not outside, sorted(outside)


def test_no_library_module_imports_a_command():
    graph = _graph()
    commands = {name for name in graph if name == 'sd_zoo.cli' or name.startswith('sd_zoo.cli.')}
    library = set(graph) - commands - {'sd_zoo'}
    offenders = {f'{m} -> {t}' for m in library for t in graph[m] & commands}
    assert not offenders, sorted(offenders)


def test_at_most_eight_modules_at_the_top_and_a_docstring_on_every_module():
    top = [p.name for p in PACKAGE.glob('*.py')]
    assert len(top) <= 8, top
    undocumented = [name for name, path in _modules().items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not undocumented, undocumented


def test_the_weights_hand_the_models_their_reader_of_pretrained_weights(monkeypatch):
    import pytest
    import timm

    import sd_zoo  # noqa: F401
    from sd_zoo.errors import WeightsError
    from sd_zoo.models import sd_resnet_base
    from sd_zoo.weights import pretrained

    assert sd_resnet_base._pretrained_reader is pretrained.pretrained_state
    monkeypatch.setattr(sd_resnet_base, '_pretrained_reader', None)
    with pytest.raises(WeightsError, match='import sd_zoo'):
        timm.create_model('sd_resnet20', pretrained=True)
    assert timm.create_model('sd_resnet20').num_classes == 10  # building without weights needs no reader


def test_the_trainable_tags_are_those_of_the_data_the_trainer_reads():
    from sd_zoo import data
    from sd_zoo.models import tags

    trainable = {t for t, info in tags.TAGS.items() if 'test' in getattr(data.DATASETS.get(info.data), 'splits', ())}
    assert set(tags.trainable_tags()) == trainable and {'c10j75', 'c100', 'c100j75_cd'} <= trainable
    for info in tags.TAGS.values():  # each dataset's statistics are written once, in the tag table's constants
        if info.data in data.DATASETS:
            assert (data.DATASETS[info.data].mean, data.DATASETS[info.data].std) == (info.mean, info.std)
