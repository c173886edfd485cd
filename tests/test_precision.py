"""One precision setting (issue #13): `compute_precision.precision` sets autocast, every FSDP2
policy and the gradient scaler together; upstream's per-module keys still work when they agree;
mixes that cannot be honoured are refused in one line naming the keys; and the scaler's own
overflow skips are not counted as non-finite steps."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.fsdp import FSDPModule

from dinov2 import distributed
from dinov2.configs import get_default_config
from dinov2.data import make_dataset, make_pipeline, make_training_loader
from dinov2.fsdp import local_tensor, resolve_precision
from dinov2.train import train as train_module
from dinov2.utils.config import merge_strict, setup
from dinov2.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "dinov2" / "configs" / "train" / "vits14_cpu_smoke.yaml"
TINY = ["student.arch=vit_test_tiny", "train.OFFICIAL_EPOCH_LENGTH=3", "optim.epochs=2", "optim.warmup_epochs=1",
        "train.batch_size_per_gpu=4", "train.log_period_iterations=1"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODULES = [f"{owner}.{module}" for owner in ("student", "teacher") for module in ("backbone", "dino_head", "ibot_head")]
CUDA = torch.device("cuda")  # resolution only: nothing is allocated there
CPU = torch.device("cpu")
UPSTREAM_DEFAULT_REDUCE = {"student.backbone": torch.float16, "student.dino_head": torch.float32, "student.ibot_head": torch.float32,
                           "teacher.backbone": torch.float16, "teacher.dino_head": torch.float16, "teacher.ibot_head": torch.float16}


def _precision_cfg(*opts: str):
    return merge_strict(get_default_config(), OmegaConf.from_dotlist(list(opts)), "test").compute_precision


def _upstream_keys(param: str, reduce: str) -> list[str]:
    """Every module's upstream keys set alike: the long way to what the switch says in one key."""
    return [f"compute_precision.{name}.mixed_precision.{key}={value}" for name in MODULES
            for key, value in (("param_dtype", param), ("reduce_dtype", reduce))]


# ------------------------------------------------------------------------------------------ resolution
@pytest.mark.parametrize("setting", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("device", [CUDA, CPU])
def test_the_switch_sets_autocast_every_policy_and_the_scaler_on_any_device(setting, device):
    precision = resolve_precision(_precision_cfg(f"compute_precision.precision={setting}"), device)
    dtype = DTYPES[setting]
    assert precision.compute == dtype
    assert precision.scaler == (setting == "fp16")
    for name in MODULES:
        owner, module = name.split(".")
        policy = precision.policy(owner, module)
        assert (policy.param_dtype, policy.reduce_dtype) == (dtype, torch.float32), name
        assert precision.buffer_dtype(owner, module) == torch.float32


def test_upstream_keys_on_cuda_keep_their_per_module_reduction_and_the_fp16_scaler():
    precision = resolve_precision(_precision_cfg(), CUDA)
    assert precision.compute == torch.float16 and precision.scaler
    for name in MODULES:
        policy = precision.policy(*name.split("."))
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.float16, UPSTREAM_DEFAULT_REDUCE[name]), name


def test_upstream_keys_agreeing_on_bf16_give_bf16_without_a_scaler():
    precision = resolve_precision(_precision_cfg(*_upstream_keys("bf16", "fp32")), CUDA)
    assert precision.compute == torch.bfloat16 and not precision.scaler  # grad_scaler=true is upstream's default
    assert {precision.policy(*name.split(".")).param_dtype for name in MODULES} == {torch.bfloat16}


def test_upstream_keys_on_cpu_stay_float32_and_the_log_line_says_how_to_change_it():
    precision = resolve_precision(_precision_cfg(), CPU)
    assert precision.compute == torch.float32 and not precision.scaler
    assert {(precision.policy(*n.split(".")).param_dtype, precision.policy(*n.split(".")).reduce_dtype) for n in MODULES} == {
        (torch.float32, torch.float32)}
    assert "compute_precision.precision=bf16" in str(precision)


def test_autocast_and_scaler_follow_the_setting_on_cpu():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    for setting, dtype, scaler in (("bf16", torch.bfloat16, None), ("fp32", torch.float32, None), ("fp16", torch.float16, "cpu")):
        precision = resolve_precision(_precision_cfg(f"compute_precision.precision={setting}"), CPU)
        with precision.autocast():
            assert (a @ b).dtype == dtype, setting
        made = precision.make_scaler()
        assert (made._device if made is not None else None) == scaler, setting


@pytest.mark.parametrize(
    "opts, needles",
    [
        # the override docs/performance.md used to give: only the student backbone in bf16
        (["compute_precision.student.backbone.mixed_precision.param_dtype=bf16"],
         ["mixed_precision.param_dtype", "bf16: student.backbone", "teacher.ibot_head", "compute_precision.precision=bf16"]),
        (["compute_precision.precision=fp16", "compute_precision.grad_scaler=false"],
         ["compute_precision.precision=fp16", "compute_precision.grad_scaler=true"]),
        (["compute_precision.grad_scaler=false"], ["compute_precision.grad_scaler=true", "param_dtype=fp16"]),
        (["compute_precision.precision=bf16", "compute_precision.teacher.dino_head.mixed_precision.reduce_dtype=fp32"],
         ["compute_precision.precision=bf16", "compute_precision.teacher.dino_head.mixed_precision.reduce_dtype=fp32"]),
        # bf16 parameters but upstream's fp16 reduction left on one module: unscaled gradients underflow there
        ([*_upstream_keys("bf16", "fp32"), "compute_precision.student.ibot_head.mixed_precision.reduce_dtype=fp16"],
         ["compute_precision.student.ibot_head.mixed_precision.reduce_dtype=fp16", "bf16"]),
        (["compute_precision.precision=bfloat16"], ["compute_precision.precision", "'bfloat16'"]),
        (["compute_precision.teacher.backbone.mixed_precision.buffer_dtype=fp64"],
         ["compute_precision.teacher.backbone.mixed_precision.buffer_dtype", "'fp64'"]),
    ],
)
@pytest.mark.parametrize("device", [CUDA, CPU])  # a config that fails on the cluster fails on a laptop too
def test_mixes_that_cannot_be_honoured_are_refused_in_one_line_naming_the_keys(opts, needles, device):
    with pytest.raises(UserError) as error:
        resolve_precision(_precision_cfg(*opts), device)
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


# ------------------------------------------------------------------------------------------ the trainer
@pytest.fixture
def trainer_for(tmp_path, tiny_vit, one_thread):
    """A Trainer built from the smoke config plus options; the process group it may join is left after."""
    def build(*opts: str) -> train_module.Trainer:
        args = train_module.get_args_parser().parse_args(
            ["--config-file", str(SMOKE), "--output-dir", str(tmp_path / "run"), "--no-resume", *TINY, *opts])
        return train_module.Trainer(setup(args))

    yield build
    distributed.disable()


def _sharded_policies(model) -> dict[str, tuple[torch.dtype, torch.dtype]]:
    """(param, reduce) dtype of every FSDP2 unit of student and teacher, from its FSDP state."""
    policies = {}
    for owner in ("student", "teacher"):
        for name, module in getattr(model, owner).named_modules(prefix=owner):
            if isinstance(module, FSDPModule):
                policy = module._get_fsdp_state()._fsdp_param_group.mp_policy
                policies[name] = (policy.param_dtype, policy.reduce_dtype)
    return policies


@pytest.mark.parametrize("setting", ["bf16", "fp16", "fp32"])
def test_under_fsdp2_every_sharded_module_takes_the_setting_and_only_fp16_gets_a_scaler(trainer_for, setting):
    trainer = trainer_for("train.distributed_strategy=fsdp", f"compute_precision.precision={setting}")
    assert trainer.strategy == "fsdp"
    policies = _sharded_policies(trainer.model)
    units = {f"{owner}.{name}" for owner in ("student", "teacher") for name in getattr(trainer.model, owner)}
    blocks = {name for name in policies if ".blocks." in name}
    assert units <= set(policies) and len(blocks) == 4  # 2 blocks in each backbone, sharded one by one
    assert set(policies.values()) == {(DTYPES[setting], torch.float32)}, policies
    assert isinstance(trainer.scaler, torch.amp.GradScaler) == (setting == "fp16")


@pytest.mark.slow
def test_a_bf16_fsdp2_step_computes_in_bf16_and_keeps_float32_master_weights(trainer_for):
    trainer = trainer_for("train.distributed_strategy=fsdp", "compute_precision.precision=bf16")
    seen = {}

    def record(owner: str):
        def hook(module, args) -> None:
            seen[owner] = module.weight.dtype
        return hook

    for owner in ("student", "teacher"):
        getattr(trainer.model, owner).dino_head.mlp[0].register_forward_pre_hook(record(owner))
    pipeline = make_pipeline(trainer.cfg)
    loader = make_training_loader(pipeline.dataset_for(make_dataset(trainer.cfg.train.dataset_path)), pipeline,
                                  batch_size=4, num_workers=0, seed=0)
    batch = pipeline.to_device(next(iter(loader)), trainer.device)
    trainer.model.train()
    assert trainer.train_step(batch, dict(trainer.schedules.at(3), freeze_backbone=False)).stepped
    assert seen == {"student": torch.bfloat16, "teacher": torch.bfloat16}  # gathered in bf16 for the forward
    params = list(trainer.model.student.parameters())
    assert {p.dtype for p in params} == {torch.float32} and {p.grad.dtype for p in params if p.grad is not None} == {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["auto", "fsdp"])  # auto: one process, unwrapped; fsdp: sharded (DTensor) gradients
def test_the_scalers_overflow_skips_are_not_non_finite_steps(trainer_for, strategy):
    trainer = trainer_for(f"train.distributed_strategy={strategy}", "compute_precision.precision=fp16",
                          "train.max_consecutive_nonfinite=2")
    init_scale = 2.0**40  # every fp16 backward overflows until the scaler has halved this ~25 times
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    before = {k: local_tensor(v).clone() for k, v in trainer.model.student.state_dict().items()}
    summary = trainer.train(0)
    assert summary["iterations"] == 6 and summary["nonfinite_steps"] == 0  # 6 overflows in a row, the limit is 2
    assert trainer.scaler.get_scale() == init_scale / 2**6  # the scaler skipped all six and lowered its scale
    after = trainer.model.student.state_dict()
    assert all(torch.equal(local_tensor(after[k]), before[k]) for k in before)  # skipped: no update with inf gradients


@pytest.mark.slow
def test_a_non_finite_loss_still_counts_with_the_scaler(trainer_for, monkeypatch):
    original = train_module.SSLMetaArch.compute_losses
    calls = {"n": 0}

    def nan_on_second_call(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        calls["n"] += 1
        return losses._replace(total=losses.total * float("nan")) if calls["n"] == 2 else losses

    monkeypatch.setattr(train_module.SSLMetaArch, "compute_losses", nan_on_second_call)
    trainer = trainer_for("compute_precision.precision=fp16")
    assert trainer.scaler is not None
    assert trainer.train(0)["nonfinite_steps"] == 1
