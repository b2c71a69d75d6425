"""How fast does loading published weights fail when nothing is cached and no Hub answers?

The tests assert the behaviour (tests/test_hub.py: one request, no retry); this prints the seconds, which
depend on the machine and its load::

    python benchmarks/bench_hub_fail_fast.py [--etag-timeout 1] [--name sd_resnet20.c10j75]

Three cases, each with an empty temporary Hugging Face cache and the name recorded as published: offline
mode, an endpoint that refuses connections, and one that accepts them and never answers (which costs one
``--etag-timeout``). Prints per case the seconds until the WeightsError and the HTTP requests sent.
"""
import argparse
import contextlib
import socket
import tempfile
import time
from pathlib import Path


@contextlib.contextmanager
def hub_at(url: str, offline: bool, etag_timeout: float, cache: Path):
    """huggingface_hub pointed at ``url`` with an empty ``cache``; restores its settings afterwards."""
    from huggingface_hub import constants

    saved = {k: getattr(constants, k) for k in ('ENDPOINT', 'HUGGINGFACE_CO_URL_TEMPLATE', 'HF_HUB_OFFLINE',
                                                 'HF_HUB_CACHE', 'HF_HUB_ETAG_TIMEOUT')}
    # The file URL template is built from the endpoint once, at import: both must move.
    constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE = url, url + '/{repo_id}/resolve/{revision}/{filename}'
    constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE, constants.HF_HUB_ETAG_TIMEOUT = offline, str(cache), etag_timeout
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(constants, k, v)


def counted_requests():
    """A list that every HTTP request huggingface_hub sends is appended to."""
    import httpx2  # huggingface_hub's HTTP client

    sent, real = [], httpx2.Client.send

    def send(self, request, *args, **kwargs):
        sent.append(f'{request.method} {request.url.path}')
        return real(self, request, *args, **kwargs)
    httpx2.Client.send = send
    return sent


def time_failure(name: str) -> float:
    import timm
    from sd_zoo.errors import WeightsError

    start = time.perf_counter()
    try:
        timm.create_model(name, pretrained=True)
    except WeightsError:
        return time.perf_counter() - start
    raise SystemExit(f'{name} loaded: this benchmark needs it uncached and unreachable')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--etag-timeout', type=float, default=1.0, help='HF_HUB_ETAG_TIMEOUT for the silent endpoint')
    p.add_argument('--name', default='sd_resnet20.c10j75', help='a published name (default: %(default)s)')
    args = p.parse_args()

    import sd_zoo  # noqa: F401  (registers the models)
    from sd_zoo.weights import pretrained

    sent = counted_requests()
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as closed, socket.socket() as silent:
        closed.bind(('127.0.0.1', 0))
        refused = f'http://127.0.0.1:{closed.getsockname()[1]}'
        closed.close()  # nothing listens there now
        silent.bind(('127.0.0.1', 0))
        silent.listen(8)
        pretrained.MANIFEST_PATH = Path(tmp) / 'published.json'
        pretrained.write_manifest_entry(args.name, dict(sha256='0' * 64))  # published, not cached
        cases = (('offline', refused, True), ('connection refused', refused, False),
                 ('silent endpoint', f'http://127.0.0.1:{silent.getsockname()[1]}', False))
        print(f'{"case":<20} {"seconds":>8}  requests')
        for label, url, offline in cases:
            sent.clear()
            with hub_at(url, offline, args.etag_timeout, Path(tmp) / label.replace(' ', '_')):
                seconds = time_failure(args.name)
            print(f'{label:<20} {seconds:>8.2f}  {len(sent)}: {", ".join(sent) or "none"}')


if __name__ == '__main__':
    main()
