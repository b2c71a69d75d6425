"""``sd-zoo train --compile``: each block shape is compiled once, random skipping and evaluation never hit
torch's recompile limit, and the compiled branches compute what the eager ones do."""
import pytest
import torch

import sd_zoo  # noqa: F401  (registers the models)
import timm
from sd_zoo.training.train import compile_branches


@pytest.mark.slow
def test_compile_branches_compiles_each_block_shape_once():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = timm.create_model('sd_resnet20')
    model = timm.create_model('sd_resnet20')
    model.load_state_dict(eager.state_dict())
    # sd_resnet20: stage 1 (16 ch), transition to 32, stage 2, transition to 64, stage 3.
    assert compile_branches(model) == 5
    assert torch._dynamo.config.recompile_limit >= 15

    x = torch.randn(8, 3, 32, 32)
    gates = []
    for seed in range(4):  # different blocks skipped each time
        for m, g in ((model, torch.Generator().manual_seed(seed)), (eager, torch.Generator().manual_seed(seed))):
            m.train()
            m.set_gate_generator(g)
        out = model(x)
        ref = eager(x)
        gates.append(tuple(model.last_gates))
        assert model.last_gates == eager.last_gates
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        out.sum().backward()
    assert len(set(gates)) > 1
    train_graphs = counters['stats']['unique_graphs']
    assert train_graphs == 5  # one per shape, however the gates fall

    model.eval()
    eager.eval()
    with torch.no_grad():
        for batch in (16, 7, 16, 5):  # a smaller last batch, as in evaluation
            y = torch.randn(batch, 3, 32, 32)
            torch.testing.assert_close(model(y), eager(y), rtol=1e-4, atol=1e-4)
    # Evaluation adds a graph per shape, and one batch-dynamic graph per shape for other batch sizes.
    assert counters['stats']['unique_graphs'] == 15
    assert not any('recompile' in k.lower() for k in counters['unimplemented'])
