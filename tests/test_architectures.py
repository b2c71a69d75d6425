"""The registered architectures: structure and sizes as in the papers, timm interface, weight layout."""
import pytest
import torch
from torch import nn

import timm
import sd_zoo  # noqa: F401
from sd_zoo.errors import ConfigError, InputShapeError, WeightsError
from sd_zoo.models.sd_cifar_resnet import CifarBasicBlock, ZeroPadShortcut
from sd_zoo.models.sd_imagenet_resnet import load_imagenet_resnet_weights

# He et al. 2016 (Table 6) and the stochastic-depth paper: parameter counts of the CIFAR ResNets.
HE_PARAMS_M = {'sd_resnet20': 0.27, 'sd_resnet32': 0.46, 'sd_resnet44': 0.66, 'sd_resnet56': 0.85,
               'sd_resnet110': 1.7, 'sd_resnet1202': 19.4}


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registered_models():
    names = timm.list_models('sd_*')
    for name in list(HE_PARAMS_M) + ['sd_svhn_resnet152', 'sd_resnet50', 'sd_resnet101', 'sd_resnet152']:
        assert name in names
    assert 'sd_resnet110.c10j75' in timm.list_pretrained('sd_resnet110*')


@pytest.mark.parametrize('name', list(HE_PARAMS_M))
def test_cifar_parameter_counts_match_he_et_al(name):
    model = timm.create_model(name, device='meta')  # no memory or init cost
    assert _num_params(model) / 1e6 == pytest.approx(HE_PARAMS_M[name], abs=0.01 if HE_PARAMS_M[name] < 1 else 0.05)


@pytest.mark.parametrize('name, n', [('sd_resnet20', 3), ('sd_resnet110', 18), ('sd_resnet1202', 200),
                                     ('sd_svhn_resnet152', 25)])
def test_cifar_depth_is_6n_plus_2(name, n):
    model = timm.create_model(name, device='meta')
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 6 * n + 2
    assert model.num_blocks == 3 * n
    assert [s[0].conv1.out_channels for s in (model.layer1, model.layer2, model.layer3)] == [16, 32, 64]
    assert all(c.kernel_size == (3, 3) for c in convs)  # no 1x1 projection anywhere


def test_transition_shortcut_is_subsampling_plus_zero_channels():
    sc = ZeroPadShortcut(16, 32, stride=2)
    assert not list(sc.parameters())
    x = torch.randn(2, 16, 8, 8)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0


def test_post_activation_block_eval_formula():
    torch.manual_seed(0)
    block = CifarBasicBlock(16, 32, stride=2, survival_prob=0.6).eval()
    x = torch.randn(2, 16, 8, 8)
    f = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    shortcut = torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 16, 4, 4)], 1)
    assert torch.allclose(block(x), torch.relu(shortcut + 0.6 * f), atol=1e-6)


def test_forward_shapes_and_interface():
    model = timm.create_model('sd_resnet110').eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64, 8, 8)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    assert torch.equal(model.forward_head(feats), model(x))
    assert model.get_classifier() is model.fc
    model.reset_classifier(100)
    assert model(x).shape == (2, 100)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)
    assert model.group_matcher()['blocks'] == r'^layer(\d+)\.(\d+)'
    assert model.no_weight_decay() == set()
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg['input_size'] == (3, 32, 32) and cfg['crop_pct'] == 1.0
    assert cfg['mean'] == pytest.approx((0.4914, 0.4822, 0.4465))
    assert model.pretrained_cfg['paper_ids'] == 'arXiv:1603.09382'
    assert model.pretrained_cfg['hf_hub_id'] == 'sd-zoo/sd_resnet110.c10j75'


def test_features_only_has_four_levels():
    model = timm.create_model('sd_resnet56', features_only=True).eval()
    assert model.feature_info.channels() == [16, 16, 32, 64]
    assert model.feature_info.reduction() == [1, 1, 2, 4]
    outs = model(torch.randn(1, 3, 32, 32))
    assert [o.shape[1:] for o in outs] == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
    picked = timm.create_model('sd_resnet56', features_only=True, out_indices=(1, 3))
    assert picked.feature_info.channels() == [16, 64]


def test_forward_intermediates_agrees_with_forward_features():
    model = timm.create_model('sd_resnet20').eval()
    x = torch.randn(2, 3, 32, 32)
    final, inter = model.forward_intermediates(x)
    assert torch.equal(final, model.forward_features(x))
    assert len(inter) == 4 and torch.equal(inter[-1], final)
    only = model.forward_intermediates(x, indices=[2], intermediates_only=True)
    assert len(only) == 1 and only[0].shape == (2, 32, 16, 16)
    kept = model.prune_intermediate_layers(indices=[2])
    assert kept == [2] and len(model.layer3) == 0


def test_wrong_input_gives_clear_error():
    model = timm.create_model('sd_resnet20').eval()
    with pytest.raises(InputShapeError, match=r'expects .*\(N, 3, H, W\), got \(1, 1, 32, 32\)'):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(InputShapeError, match='add a batch dimension'):
        model(torch.randn(3, 32, 32))
    with pytest.raises(InputShapeError, match='channels-last'):
        model(torch.randn(2, 32, 32, 3))
    gray = timm.create_model('sd_resnet20', in_chans=1).eval()
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_unknown_model_and_unpublished_tag_fail_fast():
    with pytest.raises(RuntimeError, match='sd_resnet999'):
        timm.create_model('sd_resnet999')
    with pytest.raises(ConfigError, match='unknown pretrained tag sd_resnet110.foo; known tags: sd_resnet110.c10, '):
        timm.create_model('sd_resnet110.foo')
    with pytest.raises(WeightsError, match=r'no published weights for sd_resnet110\.c100j75.*sd-zoo train'):
        timm.create_model('sd_resnet110.c100j75', pretrained=True)


def test_meta_device_and_dtype():
    model = timm.create_model('sd_resnet110', device='meta', dtype=torch.float64)
    assert all(p.device.type == 'meta' and p.dtype == torch.float64 for p in model.parameters())


def test_torchscript_matches_eager_in_eval():
    model = timm.create_model('sd_resnet20').eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(scripted(x), model(x), atol=1e-6)


def test_constant_depth_cd_tag_builds_constant_depth():
    # Weights of a _cd tag were trained without stochastic depth; the model must not scale branches.
    model = timm.create_model('sd_resnet20.c10j75_cd')
    assert model.survival_probs == [1.0] * 9


def test_imagenet_layout_is_timm_and_torchvision_resnet():
    import torchvision
    ours = timm.create_model('sd_resnet50', drop_path_rate=0.0).eval()
    ref_timm = timm.create_model('resnet50').eval()
    ref_tv = torchvision.models.resnet50().eval()
    assert list(ours.state_dict()) == list(ref_timm.state_dict())
    # Non-trivial statistics so that the comparison tests every layer.
    for ref in (ref_timm, ref_tv):
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.0)
        load_imagenet_resnet_weights(ours, ref.state_dict())
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.allclose(ours(x), ref(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(WeightsError, match='missing keys'):
        load_imagenet_resnet_weights(timm.create_model('sd_resnet101'), ref_timm.state_dict())


def test_imagenet_blocks_are_gated():
    model = timm.create_model('sd_resnet152', device='meta')
    assert model.num_blocks == 50
    assert model.survival_probs[-1] == pytest.approx(0.5)
    assert model.survival_probs[0] == pytest.approx(1 - 0.5 / 50)


def test_paper_code_switches_bn_init_and_shortcut_pool():
    torch.manual_seed(0)
    uniform = timm.create_model('sd_resnet20', bn_init='uniform')
    scales = torch.cat([m.weight for m in uniform.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert 0 <= scales.min() and scales.max() <= 1 and scales.std() > 0.2  # U[0, 1] as cudnn.torch, not all 1
    default = timm.create_model('sd_resnet20')
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in default.modules()
               if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(2, 16, 32, 32)
    for pool in (1, 2):
        model = timm.create_model('sd_resnet20', sd_shortcut_pool=pool)
        shortcut = model.layer2[0].shortcut
        expected = x[:, :, ::2, ::2] if pool == 1 else torch.nn.functional.avg_pool2d(x, 2)
        torch.testing.assert_close(shortcut(x)[:, :16], expected)
        assert torch.count_nonzero(shortcut(x)[:, 16:]) == 0  # zero channel padding
        torch.testing.assert_close(shortcut.as_conv()(x), shortcut(x), rtol=0, atol=1e-6)  # exact, as a conv
        assert model.sd_config()['sd_shortcut_pool'] == pool
    with pytest.raises(ConfigError, match='sd_shortcut_pool must be 1'):
        timm.create_model('sd_resnet20', sd_shortcut_pool=3)
    with pytest.raises(ConfigError, match='unknown bn_init'):
        timm.create_model('sd_resnet20', bn_init='zeros')


def test_blocks_name_the_norm_that_ends_their_branch():
    cifar = timm.create_model('sd_resnet20')
    imagenet = timm.create_model('sd_resnet50')
    assert all(b.branch_norm() is b.bn2 and b.output_activation() is b.act2 for b in cifar.layer1)
    assert all(b.branch_norm() is b.bn3 and b.output_activation() is b.act3 for b in imagenet.layer1)
    block = imagenet.layer1[0]
    block.zero_init_last()
    assert torch.count_nonzero(block.bn3.weight) == 0
