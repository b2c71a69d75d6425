"""README.md and docs/: every relative link and image resolves inside the checkout (anchors to headings
included, by GitHub's slug rules), every docs page is reachable from the README, and the README stays
short."""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / 'README.md'
DOCS = sorted((REPO / 'docs').glob('*.md'))
README_MAX_LINES = 200

FENCE = re.compile(r'^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$', re.S | re.M)
CODE_SPAN = re.compile(r'(`+).+?\1', re.S)
INLINE_LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
REFERENCE_LINK = re.compile(r'^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+"[^"]*")?\s*$', re.M)
HTML_LINK = re.compile(r'<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*"([^"]+)"', re.I)
HEADING = re.compile(r'^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$', re.M)
SCHEME = re.compile(r'^[a-z][a-z0-9+.-]*:', re.I)   # http:, https:, mailto:, ...: not files here


def _prose(text):
    """The text without fenced code blocks: a link or heading there is only an example."""
    return FENCE.sub('', text)


def _links(text):
    prose = CODE_SPAN.sub('', _prose(text))
    for pattern in (INLINE_LINK, REFERENCE_LINK, HTML_LINK):
        yield from pattern.findall(prose)


def slug(heading):
    """GitHub's anchor for a heading: its rendered text lower-cased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)   # a link renders as its text
    text = re.sub(r'[^\w\- ]', '', text.strip().lower())
    return text.replace(' ', '-')


def anchors(path):
    """Every heading anchor of a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen, result = {}, set()
    for heading in HEADING.findall(_prose(path.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f'{base}-{count}')
    return result


def broken_links(page, root=REPO):
    """Relative links and images of one Markdown page that do not resolve to a file or folder inside root
    (or to a heading of the Markdown file they point at), as 'target: why' lines."""
    problems = []
    for target in _links(page.read_text()):
        if SCHEME.match(target):
            continue
        path_part, _, fragment = target.partition('#')
        path = (page.parent / unquote(path_part)).resolve() if path_part else page.resolve()
        if not path.is_relative_to(root.resolve()):
            problems.append(f'{target}: outside the checkout')
        elif not path.exists():
            problems.append(f'{target}: no such file')
        elif fragment and path.suffix == '.md' and unquote(fragment).lower() not in anchors(path):
            problems.append(f'{target}: no heading #{fragment} in {path.name}')
    return problems


@pytest.mark.parametrize('page', [README, *DOCS], ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_and_images_resolve(page):
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    assert DOCS, 'docs/ holds no pages'
    linked = {(REPO / unquote(t.partition('#')[0])).resolve() for t in _links(README.read_text())}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


def test_readme_stays_short():
    lines = README.read_text().count('\n')
    assert lines <= README_MAX_LINES, f'README.md has {lines} lines; move detail into docs/'


def test_link_checker_finds_what_is_broken_and_ignores_code(tmp_path):
    repo = tmp_path / 'repo'
    (repo / 'docs').mkdir(parents=True)
    (repo / 'img.png').touch()
    (tmp_path / 'elsewhere.md').touch()   # exists, but outside the checkout
    (repo / 'docs' / 'page.md').write_text('# Pick your speed: depth pruning\n\n## Data\n\n## Data\n')
    page = repo / 'README.md'
    page.write_text(
        '# Top `code` heading\n'
        '[ok](docs/page.md) [ok](docs/page.md#pick-your-speed-depth-pruning) [ok](docs/page.md#data-1)\n'
        '![ok](img.png) [ok](#top-code-heading) [web](https://example.com/x.md) [mail](mailto:a@b.c)\n'
        '[gone](docs/missing.md) ![gone](missing.png) [bad](docs/page.md#nowhere) [bad](docs/page.md#data-2)\n'
        '[out](../elsewhere.md) `[span](span.md)`\n'
        '<img src="gone.png">\n'
        '```\n[fenced](fenced.md)\n```\n'
        '[ref]: refgone.md\n')
    assert broken_links(page, root=repo) == [
        'docs/missing.md: no such file', 'missing.png: no such file',
        'docs/page.md#nowhere: no heading #nowhere in page.md', 'docs/page.md#data-2: no heading #data-2 in page.md',
        '../elsewhere.md: outside the checkout', 'refgone.md: no such file', 'gone.png: no such file',
    ]
