"""Fit a training run into a wall-clock budget: the arithmetic behind ``sd-zoo train --time-budget SECONDS``.

The trainer times training steps and evaluation on a copy of the model after a warm-up (cuDNN's
autotuning, torch.compile and the first, slower steps are left out), then :func:`plan_epochs` picks the
most epochs whose training, evaluations and checkpoints fit in what is left of the budget. While training,
:class:`Deadline` ends the run after an epoch when the next one would overrun (a slower phase than the
probe saw, another process sharing the GPU). The budget counts from the start of the process
(:func:`process_age`, Linux), so Python's start-up and the data loading are inside it.
"""
import os
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

# Held back from the planned epochs: step times vary (stochastic depth draws a different depth every
# step) and the probe is short.
SAFETY = 0.05
# Seconds kept for what follows the last epoch: final weights, summary, drawing the curves, interpreter exit
# (measured: up to 3 s on a busy 2-core CPU, with matplotlib imported beforehand).
TAIL_S = 3.0
# Untimed steps before the probe's clock starts: autotuning and allocator growth happen in the first few,
# and a block skipped in all of them (p_l >= 0.5 each time) still gets its first call timed only rarely.
WARMUP_STEPS = 5


def process_age() -> float:
    """Seconds since this process started, from /proc (0.0 where that is not available)."""
    try:
        # Field 22 (start time in clock ticks after boot) is the 20th after the parenthesised command name.
        start_ticks = float(Path('/proc/self/stat').read_text().rsplit(')', 1)[1].split()[19])
        uptime = float(Path('/proc/uptime').read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf('SC_CLK_TCK'))
    except (OSError, ValueError, IndexError):
        return 0.0


def time_calls(fn: Callable[[], object], warmup: int = 0, min_calls: int = 1, min_seconds: float = 0.0,
               sync: Optional[Callable[[], None]] = None) -> Tuple[float, int]:
    """Mean seconds per call of ``fn`` and the number of timed calls, after ``warmup`` untimed calls.

    Calls go on until both ``min_calls`` and ``min_seconds`` are reached; ``sync`` (``torch.cuda.synchronize``)
    runs before every clock read, so queued GPU work is counted.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    calls = 0
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        fn()
        sync()
        calls += 1
    return (time.perf_counter() - start) / calls, calls


def evaluations(epochs: int, eval_every: int) -> int:
    """How many evaluations a run of ``epochs`` makes: every ``eval_every`` epochs, and after the last."""
    return epochs // eval_every + (epochs % eval_every != 0)


def epochs_cost(epochs: int, epoch_s: float, eval_s: float, eval_every: int) -> float:
    """Seconds that ``epochs`` epochs take: training (checkpoints included) plus their evaluations."""
    return epochs * epoch_s + evaluations(epochs, eval_every) * eval_s


def plan_epochs(available_s: float, epoch_s: float, eval_s: float, eval_every: int, max_epochs: int) -> int:
    """The most epochs, at most ``max_epochs``, whose :func:`epochs_cost` fits in ``available_s`` (0 if none does)."""
    # Every epoch costs at least epoch_s, which bounds the answer; the cost grows with the count.
    epochs = max(0, min(max_epochs, int(available_s / max(epoch_s, 1e-9))))
    while epochs > 0 and epochs_cost(epochs, epoch_s, eval_s, eval_every) > available_s:
        epochs -= 1
    return epochs


class Deadline:
    """Decides after each epoch's training steps whether the run may go on to another epoch.

    Another epoch is allowed when this epoch's evaluation, the next epoch (as long as the slower of the
    planned and the just-measured one) with its evaluation, and :data:`TAIL_S` still end within the budget.
    """

    def __init__(self, budget_s: float, started: float, epoch_s: float, eval_s: float):
        self.budget_s, self.started, self.epoch_s, self.eval_s = budget_s, started, epoch_s, eval_s

    def fits_another(self, epoch_started: float, now: Optional[float] = None) -> bool:
        now = time.perf_counter() if now is None else now
        next_epoch = max(self.epoch_s, now - epoch_started)
        return now - self.started + 2 * self.eval_s + next_epoch + TAIL_S <= self.budget_s
