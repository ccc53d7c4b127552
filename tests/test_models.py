"""Encoders built from ModelConfig: registry, stems, BatchNorm momentum, initialisation, feature maps,
pretrained torchvision-layout weights and frozen stages."""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from torch import nn

from firm.config import ModelConfig, SettingsError, preset
from firm.models import (BACKBONES, Encoder, WeightsError, freeze_bn_stats, load_pretrained, resolve_stem)




def small(**kw) -> ModelConfig:
    """A tiny encoder's settings: width 8, a 1-layer head of 32."""
    return ModelConfig(**{"width": 8, "head_hidden": 32, "head_layers": 1, "head_out": 16, **kw})


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# --- settings -----------------------------------------------------------------------------------

def test_registry_and_validation_errors_name_the_setting():
    assert set(BACKBONES) >= {"resnet18", "resnet50"}
    for field, value in (("backbone", "vgg11"), ("stem", "tiny"), ("init", "xavier"), ("frozen_stages", 5),
                         ("bn_momentum", 1.5), ("width", 0)):
        with pytest.raises(SettingsError, match=field):
            Encoder(small(**{field: value}))


def test_resolve_stem_auto_by_image_size():
    assert resolve_stem(ModelConfig(stem="auto", image_size=32)) == "cifar"
    assert resolve_stem(ModelConfig(stem="auto", image_size=64)) == "cifar"
    assert resolve_stem(ModelConfig(stem="auto", image_size=65)) == "imagenet"
    assert resolve_stem(ModelConfig(stem="auto", image_size=256)) == "imagenet"
    assert resolve_stem(ModelConfig(stem="cifar", image_size=256)) == "cifar"
    assert resolve_stem(ModelConfig(stem="imagenet", image_size=32)) == "imagenet"


def test_old_parameter_names_are_kept():
    """Model folders saved by earlier versions (config with the six old fields) still fit."""
    old = {"width": 8, "head_hidden": 32, "head_layers": 2, "head_out": 16, "in_channels": 3, "image_size": 32}
    keys = set(Encoder(ModelConfig.from_dict(old)).state_dict())
    for k in ("backbone.stem.0.weight", "backbone.stem.1.running_var", "backbone.stages.0.1.conv2.weight",
              "backbone.stages.1.0.shortcut.0.weight", "backbone.stages.3.1.bn2.num_batches_tracked",
              "head.net.0.weight", "head.net.1.running_mean", "head.net.6.weight", "head.net.7.running_var"):
        assert k in keys, k
    # 1 stem conv + 16 block convs + 3 shortcut convs, 20 BatchNorms of 5 entries; head: 3 linears, 3 BNs
    assert sum(k.startswith("backbone.") for k in keys) == 20 + 20 * 5
    assert not any("stages.0.0.shortcut" in k for k in keys)


# --- BatchNorm momentum and initialisation ------------------------------------------------------

def test_every_batchnorm_uses_the_momentum_setting():
    model = Encoder(preset("paper").model)
    bns = batchnorms(model)
    assert len(bns) == 20 + 7 + 1  # backbone, hidden head layers, final non-affine BN
    assert all(bn.momentum == 0.9 for bn in bns)
    model = Encoder(small(backbone="resnet50", stem="imagenet", bn_momentum=0.25))
    assert all(bn.momentum == 0.25 for bn in batchnorms(model))


def _conv_std_expectation(conv: nn.Conv2d) -> float:
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return math.sqrt(2.0 / (conv.out_channels * k))


def test_kaiming_init_statistics():
    torch.manual_seed(0)
    model = Encoder(small(width=32, init="kaiming"))
    conv = model.backbone.stages[3][1].conv2  # 256 x 256 x 3 x 3
    assert conv.weight.std().item() == pytest.approx(_conv_std_expectation(conv), rel=0.02)
    assert conv.weight.mean().abs().item() < 1e-3
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert m.weight.std().item() == pytest.approx(math.sqrt(2.0 / m.out_features), rel=0.1)
            if m.bias is not None:
                assert torch.all(m.bias == 0)
    for bn in batchnorms(model):
        if bn.affine:
            assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_pytorch_init_differs():
    torch.manual_seed(0)
    model = Encoder(small(width=32, init="pytorch"))
    conv = model.backbone.stages[3][1].conv2
    fan_in = conv.in_channels * 9
    # PyTorch's default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in)
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.02)
    assert abs(conv.weight.std().item() - _conv_std_expectation(conv)) > 0.3 * _conv_std_expectation(conv)
    final = model.head.net[-2]
    assert isinstance(final, nn.Linear) and final.bias.abs().sum() > 0


def test_init_is_deterministic_under_a_seed():
    torch.manual_seed(3)
    a = Encoder(small()).state_dict()
    torch.manual_seed(3)
    b = Encoder(small()).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- shapes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone,dim", [("resnet18", 64), ("resnet50", 256)])
def test_feature_shapes_cifar_and_imagenet_stems(backbone, dim):
    torch.manual_seed(0)
    cifar = Encoder(small(backbone=backbone, stem="cifar")).eval()
    imagenet = Encoder(small(backbone=backbone, stem="imagenet", image_size=128)).eval()
    auto = Encoder(small(backbone=backbone, stem="auto", image_size=128)).eval()
    assert cifar.feature_dim == imagenet.feature_dim == dim
    x32, x128 = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        assert cifar.features(x32).shape == (2, dim)
        assert imagenet.features(x128).shape == (2, dim)
        assert cifar(x32).shape == (2, 16)
        # the ImageNet stem at 128 px ends on the map the CIFAR stem gives at 32 px
        assert cifar.feature_maps(x32, (4,))[0].shape == imagenet.feature_maps(x128, (4,))[0].shape == (2, dim, 4, 4)
        assert cifar.feature_maps(torch.rand(1, 3, 64, 64), (4,))[0].shape[-1] == 8  # no downsampling stem
    assert auto.backbone.stem_kind == "imagenet"
    assert isinstance(imagenet.backbone.stem[-1], nn.MaxPool2d)
    assert imagenet.backbone.stem[0].kernel_size == (7, 7) and imagenet.backbone.stem[0].stride == (2, 2)


def test_feature_maps_and_map_dims():
    torch.manual_seed(0)
    model = Encoder(small()).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        maps = model.feature_maps(x)
        assert [tuple(m.shape) for m in maps] == [(3, 16, 16, 16), (3, 32, 8, 8)]
        assert model.map_dims() == [16, 32] and model.map_dims((1, 4)) == [8, 64]
        m4, m1 = model.feature_maps(x, (4, 1))
        assert m4.shape == (3, 64, 4, 4) and m1.shape == (3, 8, 32, 32)
        # the last stage's map, pooled, is the feature vector
        assert torch.allclose(m4.mean(dim=(2, 3)), model.features(x), atol=1e-6)
    assert Encoder(small(backbone="resnet50")).map_dims((2, 3)) == [64, 128]
    for bad in ((0,), (5,), ()):
        with pytest.raises(ValueError, match="stages"):
            model.feature_maps(x, bad)


@pytest.mark.parametrize("backbone,stem", [("resnet18", "cifar"), ("resnet50", "imagenet"),
                                           ("efficientnet_lite0", "imagenet")])
def test_inference_copy_computes_the_same_maps_without_batchnorm(backbone, stem):
    torch.manual_seed(0)
    model = Encoder(small(backbone=backbone, stem=stem, init="pytorch", image_size=64)).train()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # statistics a fold must carry over
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    twin = model.for_inference()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in twin.backbone.modules())
    assert not twin.training and not any(p.requires_grad for p in twin.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())  # the original is untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        expected = model.eval().feature_maps(x, (2, 3))
        got = twin.feature_maps(x, (2, 3))
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


def test_input_normalisation_follows_the_stem():
    """The ImageNet stem normalises as torchvision's pretrained weights expect; the CIFAR stem keeps x * 2 - 1."""
    x = torch.rand(2, 3, 8, 8)
    cifar = Encoder(small()).backbone
    assert torch.equal(cifar.normalize(x), x * 2 - 1)
    imagenet = Encoder(small(stem="imagenet")).backbone
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(imagenet.normalize(x), (x - mean) / std, atol=1e-6)


def test_forward_is_normalised_float32_under_autocast():
    torch.manual_seed(0)
    model = Encoder(small())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(torch.rand(4, 3, 32, 32))
    assert z.dtype == torch.float32
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)


# --- pretrained weights -------------------------------------------------------------------------

_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}


def torchvision_state(arch: str, width: int, stem_kernel: int, seed: int = 0, batches_tracked: bool = True) -> dict:
    """A state dict in torchvision's ResNet layout, written out by hand (random values)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, cout, cin, k):
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g)

    def bn(name, c):
        sd[f"{name}.weight"] = torch.randn(c, generator=g)
        sd[f"{name}.bias"] = torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = torch.rand(c, generator=g) + 0.5
        if batches_tracked:
            sd[f"{name}.num_batches_tracked"] = torch.tensor(123)

    bottleneck = arch == "resnet50"
    expansion = 4 if bottleneck else 1
    conv("conv1", width, 3, stem_kernel)
    bn("bn1", width)
    cin = width
    for i, blocks in enumerate(_LAYERS[arch]):
        planes = width * 2 ** i
        for j in range(blocks):
            p = f"layer{i + 1}.{j}"
            stride = 2 if i > 0 and j == 0 else 1
            if bottleneck:
                conv(f"{p}.conv1", planes, cin, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1)
                bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1", planes, cin, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
            if stride != 1 or cin != planes * expansion:
                conv(f"{p}.downsample.0", planes * expansion, cin, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            cin = planes * expansion
    sd["fc.weight"] = torch.randn(10, cin, generator=g)
    sd["fc.bias"] = torch.randn(10, generator=g)
    return sd


def ours(tv_key: str) -> str:
    """Our backbone's name for a torchvision key (hand-written here, independent of firm.models)."""
    if tv_key.startswith("conv1."):
        return "stem.0." + tv_key[len("conv1."):]
    if tv_key.startswith("bn1."):
        return "stem.1." + tv_key[len("bn1."):]
    layer, block, rest = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", tv_key).groups()
    return f"stages.{int(layer) - 1}.{block}.{rest.replace('downsample.', 'shortcut.')}"


def save(state: dict, path) -> None:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("arch,stem,kernel", [("resnet18", "cifar", 3), ("resnet50", "imagenet", 7)])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_round_trip(tmp_path, arch, stem, kernel, suffix):
    tv = torchvision_state(arch, 8, kernel, batches_tracked=suffix == ".pth")
    path = tmp_path / f"weights{suffix}"
    save(tv, path)
    model = Encoder(small(backbone=arch, stem=stem, weights=str(path)))
    got = model.backbone.state_dict()
    loaded = [k for k in tv if not k.startswith("fc.")]
    assert len(loaded) == len(got) - (0 if suffix == ".pth" else sum(k.endswith("num_batches_tracked") for k in got))
    for k in loaded:
        assert torch.equal(got[ours(k)], tv[k]), k
    # a model rebuilt without its pretrained start (how a saved model folder is loaded) computes the same features
    rebuilt = Encoder(dataclasses.replace(model.config, weights=None))
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval().features(x), model.eval().features(x))
    # load_pretrained also works on an existing model; the head is untouched
    other = Encoder(small(backbone=arch, stem=stem))
    head = {k: v.clone() for k, v in other.head.state_dict().items()}
    load_pretrained(other, path)
    assert all(torch.equal(other.backbone.state_dict()[ours(k)], tv[k]) for k in loaded)
    assert all(torch.equal(other.head.state_dict()[k], v) for k, v in head.items())


_CALLS: list[str] = []


def _record(what: str) -> str:
    _CALLS.append(what)
    return what


class Sneaky:
    """Unpickling this would call _record: proof that the file was unpickled without restriction."""

    def __reduce__(self):
        return (_record, ("unpickled",))


def test_pth_with_objects_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "evil.pth"
    state = torchvision_state("resnet18", 8, 3)
    state["extra"] = Sneaky()
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"evil\.pth.*other than tensors"):
        Encoder(small(weights=str(path)))
    assert _CALLS == []


def test_non_state_dicts_are_refused(tmp_path):
    tensors = torchvision_state("resnet18", 8, 3)
    cases = {"list.pth": list(tensors.values()), "nested.pth": {"epoch": torch.tensor(3), "state_dict": tensors},
             "numbers.pt": {"epoch": 3}}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(WeightsError, match=re.escape(name)):
            Encoder(small(weights=str(tmp_path / name)))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="junk.safetensors"):
        Encoder(small(weights=str(tmp_path / "junk.safetensors")))
    with pytest.raises(WeightsError, match="do not exist"):
        Encoder(small(weights=str(tmp_path / "absent.pth")))
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(WeightsError, match="unknown file type"):
        Encoder(small(weights=str(tmp_path / "w.npz")))


def test_mismatched_weights_give_a_clear_error(tmp_path):
    imagenet = tmp_path / "resnet18_imagenet.safetensors"
    save(torchvision_state("resnet18", 8, 7), imagenet)
    with pytest.raises(WeightsError, match=r"resnet18_imagenet\.safetensors.*--stem imagenet"):
        Encoder(small(stem="cifar", weights=str(imagenet)))
    r50 = tmp_path / "r50.pth"
    save(torchvision_state("resnet50", 8, 7), r50)
    with pytest.raises(WeightsError, match=r"r50\.pth.*--backbone resnet50"):
        Encoder(small(stem="imagenet", weights=str(r50)))
    with pytest.raises(WeightsError, match="--width 8"):
        Encoder(small(width=16, weights=str(imagenet), stem="imagenet"))
    partial = torchvision_state("resnet18", 8, 3)
    del partial["layer3.1.bn2.running_var"]
    save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"partial\.pth.*missing.*layer3\.1\.bn2\.running_var"):
        Encoder(small(weights=str(tmp_path / "partial.pth")))


# --- freezing -----------------------------------------------------------------------------------

def test_frozen_stages_do_not_change_in_training(tmp_path):
    path = tmp_path / "w.safetensors"
    save(torchvision_state("resnet18", 8, 3), path)
    torch.manual_seed(0)
    model = Encoder(small(weights=str(path), frozen_stages=2))
    model.train()
    frozen = [model.backbone.stem, model.backbone.stages[0], model.backbone.stages[1]]
    assert all(not m.training for m in frozen) and model.backbone.stages[2].training and model.head.training
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.rand(8, 3, 32, 32)).sum().backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        is_frozen = k.startswith(("backbone.stem.", "backbone.stages.0.", "backbone.stages.1."))
        if is_frozen:
            assert torch.equal(after[k], v), k  # weights and BatchNorm statistics
    assert not torch.equal(after["backbone.stages.2.0.conv1.weight"], before["backbone.stages.2.0.conv1.weight"])
    assert not torch.equal(after["backbone.stages.3.1.bn2.running_mean"], before["backbone.stages.3.1.bn2.running_mean"])
    model.eval()
    model.train()
    assert all(not m.training for m in frozen)


def test_freeze_bn_stats_keeps_backbone_statistics():
    torch.manual_seed(0)
    model = Encoder(small())
    freeze_bn_stats(model)
    model.train()
    stats = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    head_stats = model.head.net[1].running_mean.clone()
    model(torch.rand(8, 3, 32, 32))
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in stats.items())
    assert not torch.equal(model.head.net[1].running_mean, head_stats)
    assert all(p.requires_grad for p in model.parameters())
