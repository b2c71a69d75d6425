"""The stochastic-depth mechanism against the paper: schedule, gate statistics, skipping, scaling rules."""
import math

import pytest
import torch
from torch import nn

import timm
import sd_zoo  # noqa: F401  (registers the models)
from sd_zoo.errors import ConfigError
from sd_zoo.models.sd_cifar_resnet import CifarBasicBlock, SDCifarResNet
from sd_zoo.models.stochastic_depth import StochasticDepth, expected_depth, survival_probs

# Bernoulli frequency checks allow this many standard deviations: a false failure has odds < 1e-5.
Z = 4.5


def test_linear_schedule_matches_paper_eq4():
    probs = survival_probs(54, drop_path_rate=0.5, schedule='linear')
    assert len(probs) == 54
    assert probs[0] == pytest.approx(1 - 0.5 / 54)
    assert probs[26] == pytest.approx(1 - 27 / 54 * 0.5)
    assert probs[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(probs, probs[1:]))


def test_resnet110_expected_depth_is_40_25():
    model = timm.create_model('sd_resnet110')
    assert model.num_blocks == 54
    assert model.expected_depth == pytest.approx(40.25)  # the paper's number for p_L = 0.5
    assert model.survival_probs == pytest.approx([1 - l / 54 * 0.5 for l in range(1, 55)])
    # Transition blocks (first of stages 2 and 3) are gated like the others.
    assert model.layer2[0].stochastic_depth.survival_prob == pytest.approx(1 - 19 / 54 * 0.5)


def test_uniform_and_explicit_schedules():
    assert survival_probs(5, 0.2, 'uniform') == pytest.approx([0.8] * 5)
    explicit = [0.9, 0.5, 0.1]
    assert survival_probs(3, 0.5, explicit) == explicit
    model = timm.create_model('sd_resnet20', sd_probs=[0.5] * 9)
    assert model.survival_probs == [0.5] * 9 and model.expected_depth == pytest.approx(4.5)
    assert model.sd_config()['sd_probs'] == [0.5] * 9 and 'drop_path_rate' not in model.sd_config()


@pytest.mark.parametrize('kwargs', [
    {}, dict(drop_path_rate=0.0), dict(drop_path_rate=0.3, sd_schedule='uniform'),
    dict(sd_probs=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]), dict(sd_gate='sample', sd_rule='inverted'),
    dict(sd_shortcut_pool=2)])
def test_sd_config_is_exactly_the_create_model_arguments(kwargs):
    model = timm.create_model('sd_resnet20', **kwargs)
    config = model.sd_config()
    assert {k: config[k] for k in kwargs} == kwargs
    rebuilt = timm.create_model('sd_resnet20', **config)
    assert rebuilt.sd_config() == config and rebuilt.survival_probs == model.survival_probs
    assert [m.gate for m in rebuilt.stochastic_depth_modules()] == [m.gate for m in model.stochastic_depth_modules()]
    assert timm.create_model('sd_resnet20', drop_path_rate=0.0).expected_depth == 9
    assert expected_depth([0.25, 0.75]) == 1.0


@pytest.mark.parametrize('kwargs, match', [
    (dict(drop_path_rate=1.5), r'drop_path_rate .* \[0, 1\]'),
    (dict(drop_path_rate=-0.1), r'drop_path_rate'),
    (dict(sd_probs=[0.5] * 8), r'8 values for a net of 9 blocks'),
    (dict(sd_probs=[0.5] * 8 + [1.2]), r'block 9 is 1.2'),
    (dict(sd_schedule='cosine'), r"unknown survival schedule 'cosine'"),
    (dict(sd_gate='row'), r"unknown sd_gate 'row'"),
    (dict(sd_rule='scaled'), r"unknown sd_rule 'scaled'"),
    (dict(sd_probs=[0.0] + [1.0] * 8, sd_rule='inverted'), r'inverted rule divides'),
])
def test_bad_settings_raise_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        timm.create_model('sd_resnet20', **kwargs)


def _per_block_frequencies(model, steps, batch=2, size=8):
    model.train()
    model.reset_block_stats()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    mods = model.stochastic_depth_modules()
    assert all(m.num_calls == steps for m in mods)
    return [m.num_executed / steps for m in mods]


def test_each_block_runs_with_its_survival_probability():
    torch.manual_seed(0)
    probs = [0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0, 0.0]
    model = SDCifarResNet(blocks_per_stage=3, channels=(4, 4, 4), sd_probs=probs)  # narrow: many cheap steps
    steps = 2000
    freqs = _per_block_frequencies(model, steps, batch=2, size=4)
    for p, f in zip(probs, freqs):
        bound = Z * math.sqrt(p * (1 - p) / steps)
        assert abs(f - p) <= bound + 1e-12, (p, f, bound)
    # The total over all blocks follows the expected depth.
    stats = model.block_stats()
    assert stats['total'] == steps * 9
    assert stats['executed'] / steps == pytest.approx(sum(probs), abs=Z * math.sqrt(sum(p * (1 - p) for p in probs) / steps))


def test_one_draw_per_block_per_minibatch():
    torch.manual_seed(1)
    model = timm.create_model('sd_resnet20', sd_probs=[0.5] * 9).train()
    outputs = {}
    for m in model.modules():
        if isinstance(m, CifarBasicBlock):
            m.conv1.register_forward_hook(lambda mod, i, o: outputs.setdefault(id(mod), []).append(o.shape[0]))
    model(torch.randn(16, 3, 8, 8))
    # A kept block computes its branch for the whole batch; a dropped one not at all.
    assert sorted(set(b for v in outputs.values() for b in v)) == [16]
    assert len(outputs) == sum(model.last_gates)


def _conv_backward_nodes(out):
    seen, stack, count = set(), [out.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += 'Convolution' in type(fn).__name__
        stack.extend(f for f, _ in fn.next_functions)
    return count


def test_dropped_block_costs_no_branch_compute_forward_or_backward():
    torch.manual_seed(2)
    model = timm.create_model('sd_resnet110').train()
    conv_calls = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda *a: conv_calls.append(1))
    out = model(torch.randn(2, 3, 8, 8))
    executed = sum(model.last_gates)
    assert executed < 54  # p_L = 0.5: some block was dropped with overwhelming probability
    assert len(conv_calls) == 1 + 2 * executed  # stem + two convs per executed block
    assert _conv_backward_nodes(out) == 1 + 2 * executed  # nothing recorded for backward either
    assert model.block_stats() == dict(executed=executed, total=54)


def test_every_parameter_gets_a_gradient_after_drops():
    probs = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]  # blocks 2, 4, 7 always dropped
    model = timm.create_model('sd_resnet20', sd_probs=probs).train()
    model(torch.randn(4, 3, 16, 16)).logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    for block, p in zip(blocks, probs):
        grads = [q.grad for q in block.branch_parameters()]
        assert len(grads) == 6  # conv1, bn1 (w, b), conv2, bn2 (w, b)
        if p == 0.0:
            assert all(torch.count_nonzero(g) == 0 for g in grads)
        else:
            assert any(torch.count_nonzero(g) > 0 for g in grads)


def test_optimizer_still_applies_weight_decay_to_dropped_blocks():
    model = timm.create_model('sd_resnet20', sd_probs=[0.0] * 9).train()
    w = model.layer1[0].conv1.weight
    before = w.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    # Zero gradient plus weight decay shrinks the weights, as in the paper's Torch code.
    assert torch.allclose(w.detach(), before * (1 - 0.1 * 1e-2))


def _block_with_fixed_branch(p, rule, gate):
    torch.manual_seed(3)
    block = CifarBasicBlock(8, 8, survival_prob=p, gate=gate, rule=rule).double()
    for bn in (block.bn1, block.bn2):  # non-trivial but fixed (eval-mode) BatchNorm
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    block.train()
    block.bn1.eval()
    block.bn2.eval()
    return block


def _branch_train_mean_and_eval(block, x, draws):
    """The branch output, the mean of ``draws`` training forwards, and the eval forward."""
    with torch.no_grad():
        branch = block.forward_branch(x)
        train_mean = sum(block(x) for _ in range(draws)) / draws
        block.eval()
        return branch, train_mean, block(x)


@pytest.mark.parametrize('rule', ['paper', 'inverted'])
@pytest.mark.parametrize('gate', ['batch', 'sample'])
def test_mean_of_training_sum_equals_eval_sum(rule, gate):
    p, draws = 0.7, 4000
    block = _block_with_fixed_branch(p, rule, gate)
    block.act2 = nn.Identity()  # look at the sum before the final ReLU
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    branch, train_mean, eval_sum = _branch_train_mean_and_eval(block, x, draws)
    assert torch.allclose(eval_sum, x + (p if rule == 'paper' else 1.0) * branch, atol=1e-6)
    # Each element of the mean is shortcut + (k / draws) * c * branch with k ~ Binomial(draws, p).
    c = 1.0 if rule == 'paper' else 1.0 / p
    bound = Z * math.sqrt(p * (1 - p) / draws) * c * branch.abs() + 1e-9
    assert ((train_mean - eval_sum).abs() <= bound).all()


def test_after_the_relu_the_means_differ():
    p, draws = 0.5, 2000
    block = _block_with_fixed_branch(p, 'paper', 'batch')
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    branch, train_mean, eval_out = _branch_train_mean_and_eval(block, x, draws)
    # E[relu(x + b f)] = p relu(x + f) + (1 - p) relu(x), which differs from relu(x + p f).
    exact_mean = p * torch.relu(x + branch) + (1 - p) * torch.relu(x)
    assert torch.allclose(eval_out, torch.relu(x + p * branch), atol=1e-6)
    assert (exact_mean - eval_out).abs().max() > 0.1
    assert (train_mean - exact_mean).abs().max() < Z * 0.5 / math.sqrt(draws) * branch.abs().max()


def test_eval_mode_is_deterministic_and_uses_no_rng():
    model = timm.create_model('sd_resnet110').eval()
    x = torch.randn(2, 3, 32, 32)
    state = torch.get_rng_state()
    y1, y2 = model(x), model(x)
    assert torch.equal(y1, y2)
    assert torch.equal(state, torch.get_rng_state())


def test_manual_seed_and_generator_make_gates_repeatable():
    model = timm.create_model('sd_resnet110').train()
    x = torch.randn(2, 3, 8, 8)

    def gates(n):
        out = []
        for _ in range(n):
            model(x)
            out.append(model.last_gates)
        return out

    torch.manual_seed(5)
    a = gates(3)
    torch.manual_seed(5)
    assert gates(3) == a
    model.set_gate_generator(torch.Generator().manual_seed(11))
    b = gates(3)
    model.set_gate_generator(torch.Generator().manual_seed(11))
    torch.manual_seed(99)  # the global RNG no longer matters
    assert gates(3) == b
    assert b != a


def test_grad_checkpointing_recomputes_with_the_same_gates():
    x = torch.randn(4, 3, 16, 16)

    def grads(checkpointing):
        torch.manual_seed(0)
        model = timm.create_model('sd_resnet20', sd_probs=[0.5] * 9).train()
        model.set_grad_checkpointing(checkpointing)
        # A generator the checkpoint's RNG restore does not cover: the gates must come from the plan.
        model.set_gate_generator(torch.Generator().manual_seed(3))
        model(x).sum().backward()
        return model.last_gates, [p.grad.clone() for p in model.parameters()]

    gates_a, ga = grads(False)
    gates_b, gb = grads(True)
    assert gates_a == gates_b and not all(gates_a)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ga, gb))


def test_standalone_module_draws_its_own_gate():
    sd = StochasticDepth(0.3)
    torch.manual_seed(0)
    keeps = [sd.next_gate(4) for _ in range(2000)]
    assert abs(sum(keeps) / 2000 - 0.3) < Z * math.sqrt(0.21 / 2000)
    assert isinstance(StochasticDepth(0.3, gate='sample').next_gate(4), torch.Tensor)
