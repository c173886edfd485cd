"""Collapse monitors: they flag a collapsed teacher and leave a healthy one alone, warn once when a
collapse lasts, reach the training log, and change no number of the training itself."""
import json
import logging

import pytest
import torch

from conftest import FIXTURES
from dinov2.train import train as train_module
from dinov2.train.monitors import MONITORS, CollapseWatch, collapse_monitors
from dinov2.utils.config import setup
from test_meta_arch import _meta_arch_from_fixture
from test_train import SMOKE, TINY

K = 256


def _flagged(monitors: dict[str, torch.Tensor], reachable: int) -> set[str]:
    record = {name: float(value) for name, value in monitors.items()}
    return {symptom.monitor for symptom in CollapseWatch(patience=1).symptoms(record, reachable)}


def test_monitors_read_what_each_collapse_looks_like():
    rows, dim = 32, 48
    generator = torch.Generator().manual_seed(0)
    sharp = torch.softmax(torch.randn(rows, K, generator=generator) / 0.05, dim=-1)
    spread_features = torch.randn(rows, dim, generator=generator)
    healthy = collapse_monitors(sharp, spread_features, dino_cross_entropy=None)
    assert healthy["teacher_entropy"] < 0.5 and healthy["prototypes_in_use"] > 10
    assert healthy["teacher_feature_std"] == pytest.approx(1.0, abs=0.2)  # random directions: a sphere's spread
    assert _flagged(healthy, reachable=rows) == set()

    uniform = collapse_monitors(torch.full((rows, K), 1 / K), spread_features, None)
    assert float(uniform["teacher_entropy"]) == pytest.approx(1.0, abs=1e-6)
    one_prototype = collapse_monitors(torch.nn.functional.one_hot(torch.zeros(rows, dtype=torch.long), K).float(), spread_features, None)
    assert float(one_prototype["prototypes_in_use"]) == pytest.approx(1.0, abs=1e-4)
    same_feature = collapse_monitors(sharp, spread_features[:1].expand(rows, dim), None)
    assert float(same_feature["teacher_feature_std"]) == pytest.approx(0.0, abs=1e-6)
    assert _flagged(uniform, rows) == {"teacher_entropy"}
    assert _flagged(one_prototype, rows) == {"prototypes_in_use"}
    assert _flagged(same_feature, rows) == {"teacher_feature_std"}


def test_kl_is_the_cross_entropy_above_the_teachers_entropy():
    teacher = torch.softmax(torch.randn(6, K), dim=-1)
    student = torch.log_softmax(torch.randn(6, K), dim=-1)
    cross_entropy = -(teacher * student).sum(dim=-1).mean()
    kl = torch.nn.functional.kl_div(student, teacher, reduction="batchmean")
    monitors = collapse_monitors(teacher, torch.randn(6, 8), cross_entropy)
    assert float(monitors["student_teacher_kl"]) == pytest.approx(float(kl), rel=1e-5)


@pytest.mark.usefixtures("fixture_vit")
def test_a_constant_teacher_head_is_flagged_and_the_real_one_is_not():
    """The constructed collapse: a teacher head that gives every image the same output."""
    reference = torch.load(FIXTURES / "meta_arch_sinkhorn.pt", weights_only=True)
    batch = reference["steps"][0]["batch"]
    model = _meta_arch_from_fixture(reference)
    rows = batch["collated_global_crops"].shape[0]
    assert _flagged(model.compute_losses(batch, teacher_temp=0.04).monitors, rows) == set()
    model.teacher.dino_head.forward = lambda x: torch.ones(x.shape[0], model.cfg.dino.head_n_prototypes)
    assert "teacher_entropy" in _flagged(model.compute_losses(batch, teacher_temp=0.04).monitors, rows)


def test_a_lasting_collapse_warns_once_and_a_passing_one_not_at_all():
    watch = CollapseWatch(patience=30)
    collapsed, healthy = {"teacher_entropy": 0.999}, {"teacher_entropy": 0.4}
    assert watch.update(0, collapsed, 64) == [] and watch.update(20, collapsed, 64) == []
    assert watch.update(25, healthy, 64) == []  # recovered: the stretch starts again
    assert watch.update(30, collapsed, 64) == [] and watch.update(50, collapsed, 64) == []
    (line,) = watch.update(60, collapsed, 64)
    assert "teacher_entropy" in line and "since iteration 30" in line and "teacher.teacher_temp" in line
    assert watch.update(90, collapsed, 64) == []  # said once
    assert CollapseWatch(patience=0).update(10**6, collapsed, 64) == []  # 0: never


def _trainer(output_dir, *opts):
    args = train_module.get_args_parser().parse_args(["--config-file", str(SMOKE), "--output-dir", str(output_dir), *TINY, *opts])
    return train_module.Trainer(setup(args))


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_vit")
def test_a_run_logs_the_monitors_and_warns_when_its_teacher_collapses(tmp_path, caplog, monkeypatch):
    """Both runs with LayerScale 1 (features that differ from the first step on); the collapse
    warning comes after the learning-rate warm-up (iterations 0-2), once the teacher has given
    uniform outputs for 2 iterations."""
    caplog.set_level(logging.WARNING, logger="dinov2")
    opts = ("student.layerscale=1.0", "train.collapse_warning_iterations=2")
    _trainer(tmp_path / "healthy", *opts).train(0)
    lines = [json.loads(line) for line in (tmp_path / "healthy" / "training_metrics.json").read_text().splitlines()]
    assert all(set(MONITORS) <= set(line) for line in lines)
    assert not [r for r in caplog.records if r.getMessage().startswith("collapse:")]

    collapsed = _trainer(tmp_path / "collapsed", *opts)
    n_prototypes = collapsed.cfg.dino.head_n_prototypes
    monkeypatch.setattr(collapsed.model.teacher.dino_head, "forward", lambda x: torch.zeros(x.shape[0], n_prototypes))
    collapsed.train(0)
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("collapse:")]
    assert len(warnings) == 1 and "since iteration 3 (teacher_entropy)" in warnings[0], warnings


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_vit")
def test_the_monitors_change_no_loss_of_a_fixed_seed_run(tmp_path, monkeypatch):
    def losses(name: str) -> list[float]:
        _trainer(tmp_path / name).train(0)
        return [json.loads(line)["total_loss"] for line in (tmp_path / name / "training_metrics.json").read_text().splitlines()]

    with_monitors = losses("with")
    monkeypatch.setattr("dinov2.train.ssl_meta_arch.collapse_monitors", lambda *args: {})
    assert losses("without") == with_monitors  # to the last bit
