"""Model registry: one table of presets, factories by import path, records that rebuild exactly,
the meta-device sizing that keeps a crafted record from allocating, and the error wording."""

import json
import math

import pytest
import torch

from hpcdistill.config import ConfigError
from hpcdistill.models import (
    BUILTIN_FACTORIES,
    MODELS,
    ModelError,
    count_parameters,
    default_model,
    diff_manifests,
    manifest,
    resolve_model,
    sized_manifest,
    spec_from_record,
)

IMAGE = {"kind": "image", "input_shape": (1, 8, 8), "num_classes": 10}
SEQ = {"kind": "sequence", "input_shape": (32,), "num_classes": 40}


def spec(name):
    return SEQ if MODELS[name].kind == "sequence" else IMAGE


def batch(name, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    if MODELS[name].kind == "sequence":
        return torch.randint(0, SEQ["num_classes"], (b, *SEQ["input_shape"]), generator=g)
    return torch.randn(b, *IMAGE["input_shape"], generator=g)


def build(name, seed=0):
    torch.manual_seed(seed)
    kw = spec(name)
    return resolve_model(name, kind=kw["kind"]).build(kw["input_shape"], kw["num_classes"])


def test_one_table_names_every_builtin_and_its_factory():
    assert set(MODELS) == {"mlp", "mlp-large", "mlp-small", "cnn", "cnn-small", "charlm", "charlm-large",
                           "charlm-small"}
    assert {e.factory for e in MODELS.values()} == set(BUILTIN_FACTORIES)
    assert all(e.about and e.kind in ("image", "sequence") for e in MODELS.values())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_builds_and_forward_shapes(name):
    model, x = build(name), batch(name)
    want = (4, 32, 40) if MODELS[name].kind == "sequence" else (4, 10)
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert out.shape == want and torch.isfinite(out).all()
    out.sum().backward()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_record_round_trips_through_json_and_rebuilds_the_same_model(name):
    kw = spec(name)
    s = resolve_model(name, kind=kw["kind"])
    record = json.loads(json.dumps(s.record(kw["input_shape"], kw["num_classes"])))
    assert record["name"] == name and record["factory"] == MODELS[name].factory and record["args"] == MODELS[name].args
    rebuilt, shape, classes = spec_from_record(record, factories={}, where="test")
    a = build(name, seed=0)
    torch.manual_seed(0)
    b = rebuilt.build(shape, classes)  # same seed, same record: same initial weights
    for (ka, pa), (kb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(pa, pb)
    assert sized_manifest(rebuilt, shape, classes) == manifest(a)  # the meta device agrees with the real one


@pytest.mark.parametrize("small,default,large", [("mlp-small", "mlp", "mlp-large"),
                                                 ("charlm-small", "charlm", "charlm-large")])
def test_sizes_ordered(small, default, large):
    n = [count_parameters(build(m)) for m in (small, default, large)]
    assert n[0] < n[1] < n[2]
    assert count_parameters(build("cnn-small")) < count_parameters(build("cnn"))


def test_model_args_update_a_preset_and_hinton_teacher_shape():
    assert resolve_model("mlp-large", kind="image").args == {"hidden": [1200, 1200], "dropout": 0.2}
    s = resolve_model("mlp", '{"hidden": [64], "dropout": 0.0}', kind="image")
    assert s.args == {"hidden": [64], "dropout": 0.0}
    assert count_parameters(s.build((1, 8, 8), 10)) == 64 * 64 + 64 + 64 * 10 + 10


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
    assert resolve_model(None, kind="sequence").name == "charlm"
    with pytest.raises(ModelError, match="image"):
        default_model("audio")


def test_unknown_name_lists_valid_names_and_the_import_path_form():
    with pytest.raises(ModelError) as err:
        resolve_model("resnet50", kind="image")
    assert all(name in str(err.value) for name in MODELS) and "package.module:callable" in str(err.value)
    assert issubclass(ModelError, ValueError)


@pytest.mark.parametrize("name,kind,valid", [("charlm", "image", "mlp-small"), ("mlp", "sequence", "charlm-small")])
def test_kind_mismatch_lists_valid_names(name, kind, valid):
    with pytest.raises(ModelError, match=valid):
        resolve_model(name, kind=kind)


def test_bad_builtin_args_name_the_variable():
    with pytest.raises(ModelError, match=r"HPCDISTILL_MODEL=cnn: .*needs input_shape \(C, H, W\)"):
        resolve_model("cnn", kind="image").build((64,), 10)
    with pytest.raises(ModelError, match="dropout"):
        resolve_model("mlp", '{"dropout": "0.1"}', kind="image").build((64,), 10)
    with pytest.raises(ModelError, match="unexpected keyword argument 'width'"):
        resolve_model("mlp", '{"width": 3}', kind="image").build((64,), 10)
    with pytest.raises(ConfigError, match="HPCDISTILL_MODEL_ARGS=.*JSON object"):
        resolve_model("mlp", "[1, 2]", kind="image")
    with pytest.raises(ConfigError, match="HPCDISTILL_MODEL_ARGS=.*NaN is not a JSON number"):
        resolve_model("mlp", '{"dropout": NaN}', kind="image")
    with pytest.raises(ModelError, match="non-finite"):
        spec_from_record({"name": "x", "factory": MODELS["mlp"].factory, "args": {"dropout": math.inf},
                          "input_shape": [64], "num_classes": 10}, factories={}, where="f.h5")


def test_records_name_only_factories_the_job_allows():
    record = {"name": "evil", "factory": "os:system", "args": {}, "input_shape": [4], "num_classes": 2}
    with pytest.raises(ModelError, match="'os:system', which this job does not name"):
        spec_from_record(record, factories={}, where="f.h5")
    s, shape, classes = spec_from_record({**record, "factory": "collections:OrderedDict"},
                                         factories={"collections:OrderedDict": "HPCDISTILL_TEACHER_MODEL"}, where="f")
    assert (s.factory, s.variable, shape, classes) == ("collections:OrderedDict", "HPCDISTILL_TEACHER_MODEL", (4,), 2)
    for bad in ({**record, "factory": MODELS["mlp"].factory, "num_classes": 10**9},
                {**record, "factory": MODELS["mlp"].factory, "input_shape": [-1]},
                {**record, "factory": MODELS["mlp"].factory, "args": [1]}, [1, 2], {"name": "x"}):
        with pytest.raises(ModelError, match="f.h5"):
            spec_from_record(bad, factories={}, where="f.h5")


def test_a_huge_record_is_sized_without_allocating():
    """hidden [60000, 60000] is 3.6e9 parameters (14 GB): on the meta device it costs nothing."""
    s, shape, classes = spec_from_record({"name": "mlp", "factory": MODELS["mlp"].factory,
                                          "args": {"hidden": [60000, 60000], "dropout": 0.0},
                                          "input_shape": [1, 8, 8], "num_classes": 10}, factories={}, where="f")
    m = sized_manifest(s, shape, classes)
    assert m["net.4.weight"] == [[60000, 60000], "float32"]
    small = manifest(build("mlp"))
    problem = diff_manifests(m, small, "the file", "the model")
    assert "net.1.weight: the file (60000, 64) float32, the model (256, 64) float32" in problem
