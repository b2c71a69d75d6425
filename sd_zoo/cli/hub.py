"""`sd-zoo hub build|check|push|seed-cache`: the flags of each, and the lines they print."""
import argparse
import sys
from pathlib import Path
from typing import List, Sequence

from ..errors import ConfigError, WeightsError
from ..files import sha256_file
from ..models import tags
from ..publishing import hub
from ..publishing.hub import WEIGHTS, build, check, default_out, push, seed_cache, shipped_folders, upload_files
from ..ranges import NON_NEGATIVE
from ..weights import pretrained
from .args import add_number


def _folders(args_folders: Sequence[str]) -> List[Path]:
    folders = [Path(f) for f in args_folders] or shipped_folders()
    if not folders:
        raise ConfigError(f'no hub folders given and none in {pretrained.SHIPPED_DIR} yet; build one with '
                          f'`sd-zoo hub build --run RUN_DIR`')
    return folders


def run_build(args) -> int:
    out = Path(args.out) if args.out else default_out()
    manifest = None if args.no_manifest or out.resolve() != pretrained.SHIPPED_DIR.resolve() \
        else pretrained.MANIFEST_PATH
    folder = build(args.run, args.checkpoint, args.model, args.tag, out, evaluate=not args.skip_eval,
                   limit=args.limit, manifest=manifest, force=args.force, pruning_rows=args.pruning_rows,
                   progress=True, note=args.note)
    recorded = pretrained.load_manifest().get(folder.name, {}).get('sha256')
    note = f'; recorded in {manifest.name}' if manifest else \
        (f'; not recorded in sd_zoo/weights/published.json, which publishes other weights as {folder.name}: '
         f'hub check and push refuse this folder' if recorded not in (None, sha256_file(folder / WEIGHTS)) else '')
    print(f'wrote {folder}/ ({", ".join(upload_files(folder))}){note}')
    return 0


def run_check(args) -> int:
    failed = 0
    for folder in _folders(args.folders):
        if not args.skip_eval:
            print(f'hub check: {folder}: re-measuring the card\'s metrics', file=sys.stderr, flush=True)
        problems = check(folder, evaluate=not args.skip_eval, limit=args.limit)
        print(f'{folder}: ' + ('ok' if not problems else 'FAILED\n  ' + '\n  '.join(problems)))
        failed += bool(problems)
    if failed:
        raise WeightsError(f'{failed} hub folder(s) failed the check')
    return 0


def run_push(args) -> int:
    result = push(args.folder, args.repo_id, private=args.private, token=args.token, dry_run=args.dry_run,
                  commit_message=args.message)
    if args.dry_run:
        print(f'would upload to {args.repo_id}{" (private)" if args.private else ""}:')
        for f, size, digest in result:
            print(f'  {f:24s} {size:>12,d} bytes  sha256 {digest}')
    else:
        print(f'pushed {args.folder} to {args.repo_id}: {result.commit_url}')
    return 0


def run_seed_cache(args) -> int:
    for snapshot in seed_cache(_folders(args.folders), args.cache_dir):
        print(f'cached {snapshot.parent.parent.name} -> {snapshot}')
    print('load offline with HF_HUB_OFFLINE=1, e.g. '
          "HF_HUB_OFFLINE=1 python -c \"import sd_zoo, timm; timm.create_model('MODEL.TAG', pretrained=True)\"")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'hub', help='build, check, push and cache Hugging Face Hub repo folders', description=hub.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='hub_command', metavar='HUB_COMMAND', required=True)

    b = sub.add_parser('build', help='write hub_configs/<model>.<tag>/ from a training run')
    b.add_argument('--run', required=True, metavar='RUN_DIR', help='folder written by sd-zoo train')
    b.add_argument('--checkpoint', help='weights to ship (default: RUN_DIR/best.safetensors, else final)')
    b.add_argument('--model', help='architecture, for weights without sd-zoo metadata')
    b.add_argument('--tag', help='pretrained tag (default: from the data and drop_path_rate, e.g. c10j75, c10j75_cd)')
    b.add_argument('--out', help='parent folder (default: the checkout\'s hub_configs/)')
    b.add_argument('--skip-eval', action='store_true', help='take the test error from the run instead of measuring')
    add_number(b, '--limit', bound=NON_NEGATIVE, metavar='N', help='evaluate a class-balanced subset of N test images')
    b.add_argument('--no-manifest', action='store_true',
                   help='do not record the weights in sd_zoo/weights/published.json')
    b.add_argument('--force', action='store_true', help='replace an existing folder of the same model.tag')
    add_number(b, '--pruning-rows', bound=NON_NEGATIVE, default=7, metavar='N',
               help="depths in the card's pruning table (default %(default)s; 0 for none)")
    b.add_argument('--note', metavar='TEXT', help="a paragraph for the card's training section, e.g. why the "
                                                   'recipe departs from the usual one and what was measured')
    b.set_defaults(func=run_build)

    c = sub.add_parser('check', help='verify hub folders: config, strict weight load, card metrics and sha256')
    c.add_argument('folders', nargs='*', metavar='FOLDER', help='default: every folder in hub_configs/')
    c.add_argument('--skip-eval', action='store_true', help='do not re-measure the card\'s metrics (large models)')
    add_number(c, '--limit', bound=NON_NEGATIVE, metavar='N',
               help="evaluate a class-balanced subset of N test images, compared within sampling error "
                    "(default: the card's own images; 0 for all)")
    c.set_defaults(func=run_check)

    u = sub.add_parser('push', help='upload a hub folder with huggingface_hub')
    u.add_argument('folder', metavar='FOLDER')
    u.add_argument('--repo-id', required=True, metavar='ORG/NAME', help=f'e.g. {tags.HUB_ORG}/sd_resnet20.c10j75')
    u.add_argument('--dry-run', action='store_true', help='list what would be uploaded, without network')
    u.add_argument('--private', action='store_true', help='create the repo private')
    u.add_argument('--token', help='Hub token (default: HF_TOKEN or the token saved by `hf auth login`)')
    u.add_argument('--message', help='commit message')
    u.set_defaults(func=run_push)

    s = sub.add_parser('seed-cache', help='copy hub folders into the Hugging Face cache for offline loading')
    s.add_argument('folders', nargs='*', metavar='FOLDER', help='default: every folder in hub_configs/')
    s.add_argument('--cache-dir', help='Hugging Face hub cache (default: HF_HUB_CACHE, ~/.cache/huggingface/hub)')
    s.set_defaults(func=run_seed_cache)
