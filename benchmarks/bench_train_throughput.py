"""Training throughput of a stochastic-depth ResNet: fp32 against the fast settings, stochastic against constant depth.

Four variants in one run: {stochastic depth (p_L = 0.5), constant depth} x {fp32, fast}, where "fast" is what
the ``fast`` recipe chooses on this device (``train.choose_precision('auto')``: bf16 autocast where the CPU or
GPU computes bf16 natively, plus channels_last). Each step is the trainer's own (``data.Loader`` with on-device
augmentation, ``train.train_step``: forward, loss, backward, fused SGD). The variants alternate block by block
so that all see the same machine conditions, and the ratios are taken within the run::

    python benchmarks/bench_train_throughput.py [--model sd_resnet110] [--batch-size 128] [--steps 3] [--rounds 3]
"""
import argparse
import time

import torch

import sd_zoo  # noqa: F401  (registers the models)
import timm
from sd_zoo import data
from sd_zoo.training import train


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='sd_resnet110')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=3, help='timed steps per variant per round')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--num-threads', type=int)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    fast_amp, why = train.choose_precision('auto', device)

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size * 8, 32, 32, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (len(images),), generator=gen)
    cfg = train.resolve_config(dict(recipe='paper', output='-'))
    runs = {}
    for depth, rate in (('stochastic depth', 0.5), ('constant depth', 0.0)):
        for settings, amp, channels_last in (('fp32', False, False), ('fast', fast_amp == 'bf16', True)):
            torch.manual_seed(0)
            model = timm.create_model(args.model, num_classes=10, drop_path_rate=rate).train()
            model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            model.set_gate_generator(torch.Generator().manual_seed(0))
            loader = data.Loader(images, labels, args.batch_size, data.CIFAR10_MEAN, data.CIFAR10_STD, train=True,
                                 device=device, channels_last=channels_last)
            runs[depth, settings] = dict(model=model, optimizer=train.build_optimizer(model, cfg), loader=loader,
                                         amp=amp, seconds=0.0, images=0, blocks=0, steps=0)

    def step_block(run, epoch: int, timed: bool) -> None:
        batches = run['loader'].epoch(epoch)
        for _ in range(args.steps):
            _sync(device)
            t0 = time.perf_counter()
            x, y = next(batches)
            loss, _ = train.train_step(run['model'], run['optimizer'], x, y, 0.0, run['amp'])
            loss.item()
            _sync(device)
            if timed:
                run['seconds'] += time.perf_counter() - t0
                run['blocks'] += sum(run['model'].last_gates)
                run['images'] += len(y)
                run['steps'] += 1

    for run in runs.values():  # warm-up: allocator, thread pools, oneDNN kernels of each layout
        step_block(run, 0, timed=False)
    for r in range(args.rounds):
        for run in runs.values():
            step_block(run, r + 1, timed=True)

    print(f'{args.model}, batch {args.batch_size}, {args.device} ({torch.get_num_threads()} threads), '
          f'{args.rounds} rounds x {args.steps} steps per variant, alternating')
    print(f'  fast = channels_last + {why}')
    rate = {}
    for (depth, settings), run in runs.items():
        rate[depth, settings] = run['images'] / run['seconds']
        print(f"  {depth:17s} {settings:5s} {rate[depth, settings]:7.1f} images/s  "
              f"{1e3 * run['seconds'] / run['steps']:6.0f} ms/step  blocks/step {run['blocks'] / run['steps']:5.2f} "
              f"(expected {run['model'].expected_depth:.2f} of {run['model'].num_blocks})")
    for depth in ('stochastic depth', 'constant depth'):
        print(f'  fast / fp32, {depth}: {rate[depth, "fast"] / rate[depth, "fp32"]:.2f}x')
    for settings in ('fp32', 'fast'):
        print(f'  stochastic / constant depth, {settings}: '
              f'{rate["stochastic depth", settings] / rate["constant depth", settings]:.2f}x')


if __name__ == '__main__':
    main()
