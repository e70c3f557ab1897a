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


def test_a_linear_network_is_fitted_to_the_penalized_optimum():
    """No hidden layer: a convex solver (`linear_fit`), not early-stopped Adam. On standardized regression targets its
    float weights are ridge regression's closed form on the quantized inputs; the penalty is chosen on validation."""
    import numpy as np

    from molcloak.pipeline.linear_fit import DEFAULT_L2, L2_GRID
    from molcloak.pipeline.tasks import TaskSpec
    from molcloak.pipeline.train import TrainConfig, train_model

    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (240, 12)).astype(np.float32)
    y = X @ rng.normal(size=12) + 0.3 * rng.normal(size=240)
    task = TaskSpec("toy", "regression", "y")
    model = build_model("mlp", 12, 1, make_config("mlp", {"hidden": [], "weight_bits": 4, "input_bits": 4}))
    result = train_model(model, task, X[:200], y[:200], X[200:], y[200:], TrainConfig(l2=0.1))
    assert result.best_epoch == 1 and [row["l2"] for row in result.history] == [0.1]
    Xq = model.net[0](torch.as_tensor(X[:200])).value.detach().numpy().astype(np.float64)
    t = result.scaler.transform(y[:200])
    Xc, tc = Xq - Xq.mean(0), t - t.mean()  # the bias is not penalized
    w = np.linalg.solve(
        Xc.T @ Xc / 200 + 0.1 / 2 * np.eye(12), Xc.T @ tc / 200
    )  # d/dw of mean (Xw - t)²: 2X^T(Xw - t)/n
    assert np.allclose(model.net[1].weight.detach().numpy().ravel(), w, atol=2e-3)
    # without a penalty given, every one of the grid is fitted and the lowest validation loss is kept
    model = build_model("mlp", 12, 1, make_config("mlp", {"hidden": [], "weight_bits": 4, "input_bits": 4}))
    result = train_model(model, task, X[:200], y[:200], X[200:], y[200:], TrainConfig())
    losses = [row["valid_loss"] for row in result.history]
    assert [row["l2"] for row in result.history] == list(L2_GRID)
    assert losses[result.best_epoch - 1] == min(losses) and result.history[result.best_epoch - 1]["l2"] < 1
    # the grid, largest first, has no step wider than about threefold: a tenfold gap from 0.01 to 0.001 cost tox21's
    # kernel machine 0.01 ROC-AUC (session 33), where the best penalty was 0.003
    steps = np.divide(L2_GRID[:-1], L2_GRID[1:])
    assert np.all(steps > 1) and steps.max() <= 3.5
    # no validation rows and no penalty given: one fit, at the default penalty
    model = build_model("mlp", 12, 1, make_config("mlp", {"hidden": [], "weight_bits": 4, "input_bits": 4}))
    result = train_model(model, task, X, y, X[:0], y[:0], TrainConfig())
    assert [row["l2"] for row in result.history] == [DEFAULT_L2] and "valid_loss" not in result.history[0]


def test_the_convex_fit_handles_every_task_kind_with_missing_labels():
    """`fit` tries a kernel machine by default, so its convex fit meets every task kind: multi-label and multi-target
    data with missing labels (NaN, masked out of the loss) and multi-class labels."""
    import numpy as np

    from molcloak.pipeline.tasks import TaskSpec
    from molcloak.pipeline.train import TrainConfig, train_model

    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (240, 12)).astype(np.float32)
    missing = lambda shape: rng.random(shape) < 0.2  # noqa: E731
    cases = [
        (TaskSpec("t", "multilabel", "a,b,c", tasks=("a", "b", "c")), np.where(missing((240, 3)), np.nan, X[:, :3] > 0)),
        (TaskSpec("t", "multiclass", "c", labels=("x", "y", "z")), np.digitize(X[:, 0], [-0.3, 0.3])),
        (TaskSpec("t", "multitarget", "a,b", tasks=("a", "b"), task_units=("", "")), np.where(missing((240, 2)), np.nan, 2 * X[:, :2])),
    ]  # fmt: skip
    for task, y, metric, floor in zip(*zip(*cases), ("roc_auc", "roc_auc", "r2"), (0.95, 0.95, 0.9)):
        n_out = y.shape[1] if y.ndim == 2 else 3
        model = build_model(
            "mlp", 12, n_out, make_config("mlp", {"hidden": [], "weight_bits": 4, "input_bits": 4})
        )
        result = train_model(
            model, task, X[:200], y[:200].astype(float), X[200:], y[200:].astype(float), TrainConfig()
        )
        best = result.history[result.best_epoch - 1]
        assert np.isfinite(best["valid_loss"]) and best[f"valid_{metric}"] > floor, (task.kind, best)


def test_patience_in_steps_shortens_the_wait_on_large_data_only():
    """`patience_steps`: training stops after that many optimizer steps without a better validation loss, in whole
    epochs, when that is sooner than `patience` epochs (but waits at least MIN_PATIENCE epochs)."""
    import numpy as np
    import torch

    from molcloak.pipeline.tasks import TaskSpec
    from molcloak.pipeline.train import MIN_PATIENCE, TrainConfig, train_model

    cfg = TrainConfig(patience=30, patience_steps=2000)  # batches of 32
    assert cfg.effective_patience(970) == 30  # bace's inner training part: 31 steps an epoch, 65 epochs wait
    assert cfg.effective_patience(4600) == 14  # ames': 144 steps an epoch
    assert (
        cfg.effective_patience(10**6) == MIN_PATIENCE
        and TrainConfig(patience=30).effective_patience(10**6) == 30
    )
    assert (
        TrainConfig(patience=3, patience_steps=1).effective_patience(10**6) == 3
    )  # never more than patience
    with pytest.raises(ModelConfigError, match="--patience-steps 0: use a positive count of optimizer steps"):
        TrainConfig(patience_steps=0)
    # real training on noise: each run stops its own patience after its best epoch, and both are the same seeded
    # run until the shorter wait stops
    rng = np.random.default_rng(0)
    X, y = rng.uniform(-1, 1, (200, 8)).astype(np.float32), rng.integers(0, 2, 200)
    task = TaskSpec("toy", "binary", "y", labels=("0", "1"))
    runs = {}
    for steps in (None, 5):  # 160 training rows: 5 steps an epoch, so 5 steps -> MIN_PATIENCE epochs
        torch.manual_seed(0)  # the same initial weights
        model = build_model("mlp", 8, 2, make_config("mlp", {"hidden": [8]}))
        config = TrainConfig(epochs=30, patience=20, patience_steps=steps, seed=0)
        runs[steps] = train_model(model, task, X[:160], y[:160], X[160:], y[160:], config)
    short, long = runs[5], runs[None]
    assert short.epochs_run == short.best_epoch + MIN_PATIENCE < long.epochs_run
    assert long.epochs_run == min(30, long.best_epoch + 20)
    assert long.history[: short.epochs_run] == short.history
