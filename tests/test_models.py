import pytest
import torch

from molcloak.models import model_names
from molcloak.pipeline.errors import ModelConfigError
from molcloak.pipeline.networks import build_model, make_config


def test_registry_lists_mlp():
    assert "mlp" in model_names()


@pytest.mark.parametrize("n_out", [1, 2, 3])
def test_mlp_output_shape(n_out):
    model = build_model("mlp", 10, n_out, make_config("mlp", {"hidden": [8, 4]}))
    model.eval()
    assert model(torch.randn(5, 10)).shape == (5, n_out)


def test_unknown_model_and_option():
    with pytest.raises(ModelConfigError, match="unknown model 'cnn'; available: .*mlp"):
        build_model("cnn", 10, 2)
    with pytest.raises(ModelConfigError, match="has no option 'width'; valid options: .*hidden"):
        make_config("mlp", {"width": 3})


def test_bit_widths_are_checked():
    with pytest.raises(ModelConfigError, match="weight_bits=12 is out of range"):
        make_config("mlp", {"weight_bits": 12})


def test_training_is_reproducible_with_a_seed():
    from molcloak.pipeline import data, workflow
    from molcloak.pipeline.train import TrainConfig

    ds = data.load_bundled("sol-low")
    opts = dict(hidden=[4], weight_bits=2, act_bits=2, input_bits=2)
    runs = [
        workflow.train_checkpoint(ds, model_options=opts, train_config=TrainConfig(epochs=3, seed=s))
        for s in (7, 7, 8)
    ]
    same = [
        torch.equal(a, b)
        for a, b in zip(runs[0].state_dict.values(), runs[1].state_dict.values())
        if isinstance(a, torch.Tensor)
    ]
    assert same and all(same)
    assert runs[0].metrics == runs[1].metrics
    assert not all(
        torch.equal(a, b)
        for a, b in zip(runs[0].state_dict.values(), runs[2].state_dict.values())
        if isinstance(a, torch.Tensor)
    )
