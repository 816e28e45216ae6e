"""Model registry: shapes, exact rebuild from the arch record, sizes, causality, errors."""

import json

import pytest
import torch

from hpcdistill.models import (
    MODELS,
    ModelError,
    arch_for,
    build_model,
    count_parameters,
    default_model,
)

IMAGE = {"kind": "image", "input_shape": (1, 8, 8), "num_classes": 10}
SEQ = {"kind": "sequence", "input_shape": (32,), "num_classes": 40}


def spec(name):
    return SEQ if name.startswith("charlm") else IMAGE


def batch(name, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name.startswith("charlm"):
        return torch.randint(0, SEQ["num_classes"], (b, *SEQ["input_shape"]), generator=g)
    return torch.randn(b, *IMAGE["input_shape"], generator=g)


def build(name, seed=0):
    torch.manual_seed(seed)
    return build_model(arch_for(name, **spec(name)))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_builds_and_forward_shapes(name):
    model, x = build(name), batch(name)
    want = (4, 32, 40) if name.startswith("charlm") else (4, 10)
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert out.shape == want and torch.isfinite(out).all()
    out.sum().backward()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_arch_record_round_trips(name):
    arch = arch_for(name, **spec(name))
    loaded = json.loads(json.dumps(arch))
    assert loaded == arch and loaded["name"] == name

    a = build(name, seed=0)
    torch.manual_seed(0)
    b = build_model(loaded)  # same seed, same record: same initial weights
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)

    torch.manual_seed(1)
    c = build_model(loaded)
    c.load_state_dict(a.state_dict())
    x = batch(name)
    assert torch.equal(a.eval()(x), c.eval()(x))

    a.train()
    c.train()  # dropout draws the same masks under the same seed
    torch.manual_seed(7)
    ya = a(x)
    torch.manual_seed(7)
    assert torch.equal(ya, c(x))


@pytest.mark.parametrize("small,default,large", [
    ("mlp-small", "mlp", "mlp-large"),
    ("charlm-small", "charlm", "charlm-large"),
])
def test_sizes_ordered(small, default, large):
    n = [count_parameters(build(m)) for m in (small, default, large)]
    assert n[0] < n[1] < n[2]
    assert count_parameters(build("cnn-small")) < count_parameters(build("cnn"))


def test_hinton_teacher_shape():
    arch = arch_for("mlp-large", **IMAGE)
    assert arch["hidden"] == [1200, 1200] and arch["dropout"] == 0.2


def test_charlm_is_causal():
    model = build("charlm").eval()
    x = batch("charlm", b=2)
    base = model(x)
    for t in (0, 10, 30):
        y = x.clone()
        y[:, t + 1] = (y[:, t + 1] + 1) % SEQ["num_classes"]
        out = model(y)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_charlm_accepts_shorter_sequences_but_not_longer():
    model = build("charlm-small").eval()
    x = batch("charlm", b=2)
    torch.testing.assert_close(model(x[:, :5]), model(x)[:, :5], rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        model(torch.cat([x, x], dim=1))


def test_defaults():
    assert default_model("image") == "mlp" and default_model("sequence") == "charlm"
    with pytest.raises(ModelError, match="image"):
        default_model("audio")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ModelError) as err:
        arch_for("resnet50", **IMAGE)
    assert all(name in str(err.value) for name in MODELS)
    assert issubclass(ModelError, ValueError)


@pytest.mark.parametrize("name,kind_spec,valid", [
    ("charlm", IMAGE, "mlp-small"),
    ("mlp", SEQ, "charlm-small"),
])
def test_kind_mismatch_lists_valid_names(name, kind_spec, valid):
    with pytest.raises(ModelError, match=valid):
        arch_for(name, **kind_spec)


def test_bad_records_rejected():
    arch = arch_for("cnn", **IMAGE)
    with pytest.raises(ModelError, match="mlp"):
        build_model({**arch, "family": "resnet"})
    with pytest.raises(ModelError, match="missing"):
        build_model({k: v for k, v in arch.items() if k != "hidden"})
    with pytest.raises(ModelError, match="unexpected"):
        build_model({**arch, "width": 3})
    with pytest.raises(ModelError):
        build_model({**arch, "dropout": "0.1"})
    with pytest.raises(ModelError):
        arch_for("cnn", kind="image", input_shape=(64,), num_classes=10)
    with pytest.raises(ModelError):
        build_model([1, 2])
