"""Training throughput of a stochastic-depth ResNet with and without stochastic depth, and the overhead.

Runs the trainer's pieces (``data.Loader`` with on-device augmentation, ``train.build_optimizer``,
``train.lr_at``) on synthetic CIFAR-sized data, alternating the two models step block by step block so
that both see the same machine conditions, and reports images/s plus the share of step time spent
outside the model's forward/backward (data, optimizer, bookkeeping)::

    python benchmarks/bench_train_throughput.py [--model sd_resnet110] [--batch-size 128] [--steps 3]
"""
import argparse
import time

import torch
import torch.nn.functional as F

import sd_zoo  # noqa: F401  (registers the models)
import timm
from sd_zoo import data, train


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='sd_resnet110')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=3, help='timed steps per model per round')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--num-threads', type=int)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size * 8, 32, 32, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (len(images),), generator=gen)
    loader = data.Loader(images, labels, args.batch_size, data.CIFAR10_MEAN, data.CIFAR10_STD, train=True,
                         device=device)
    cfg = train.resolve_config(dict(recipe='paper', output='-'))
    runs = {}
    for name, rate in (('stochastic depth (p_L = 0.5)', 0.5), ('constant depth', 0.0)):
        torch.manual_seed(0)
        model = timm.create_model(args.model, num_classes=10, drop_path_rate=rate).to(device).train()
        model.set_gate_generator(torch.Generator().manual_seed(0))
        runs[name] = dict(model=model, optimizer=train.build_optimizer(model, cfg), times=dict(
            data=0.0, model=0.0, optimizer=0.0, other=0.0), images=0, blocks=0, steps=0)

    def step_block(run, epoch: int, timed: bool) -> None:
        model, optimizer, times = run['model'], run['optimizer'], run['times']
        batches = loader.epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        for step in range(args.steps):
            t0 = time.perf_counter()
            x, y = next(batches)
            _sync(device)
            t1 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            _sync(device)
            t2 = time.perf_counter()
            for group in optimizer.param_groups:
                group['lr'] = train.lr_at(step, 1000, len(loader), cfg)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            t3 = time.perf_counter()
            loss_sum += loss.detach()
            t4 = time.perf_counter()
            if timed:
                run['blocks'] += sum(model.last_gates)
                for key, dt in (('data', t1 - t0), ('model', t2 - t1), ('optimizer', t3 - t2), ('other', t4 - t3)):
                    times[key] += dt
                run['images'] += len(y)
                run['steps'] += 1

    for run in runs.values():  # warm-up: allocator, thread pools
        step_block(run, 0, timed=False)
    for r in range(args.rounds):
        for run in runs.values():
            step_block(run, r + 1, timed=True)

    print(f'{args.model}, batch {args.batch_size}, {args.device} ({torch.get_num_threads()} threads), '
          f'{args.rounds} rounds x {args.steps} steps per model, alternating')
    rates = {}
    for name, run in runs.items():
        times = run['times']
        total = sum(times.values())
        rates[name] = run['images'] / total
        outside = 1 - times['model'] / total
        ms = {k: 1e3 * v / run['steps'] for k, v in times.items()}
        print(f"  {name:30s} {rates[name]:7.1f} images/s  blocks/step {run['blocks'] / run['steps']:5.2f} "
              f"(expected {run['model'].expected_depth:.2f} of {run['model'].num_blocks})  "
              f"outside forward/backward {100 * outside:.2f}% (per step: forward/backward {ms['model']:.0f} ms, "
              f"data {ms['data']:.1f} ms, optimizer {ms['optimizer']:.1f} ms, other {ms['other']:.2f} ms)")
    sd, const = rates.values()
    print(f'  speed-up from stochastic depth: {sd / const:.2f}x')


if __name__ == '__main__':
    main()
