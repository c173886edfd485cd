"""The five per-iteration schedules of a DINOv2 run, built from the config as upstream does."""
from dataclasses import dataclass

from dinov2.utils.utils import CosineScheduler


@dataclass
class TrainingSchedules:
    lr: CosineScheduler
    wd: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler
    last_layer_lr: CosineScheduler

    def at(self, iteration: int) -> dict[str, float]:
        return {
            "lr": self.lr[iteration],
            "wd": self.wd[iteration],
            "mom": self.momentum[iteration],
            "teacher_temp": self.teacher_temp[iteration],
            "last_layer_lr": self.last_layer_lr[iteration],
        }


def build_schedules(cfg) -> TrainingSchedules:
    """Every `*_epochs` key is a multiple of OFFICIAL_EPOCH_LENGTH iterations (not dataset passes).

    The head's last layer is "frozen" for `freeze_last_layer_epochs` by a zero learning rate, so
    its optimizer state still advances, exactly like upstream.
    """
    epoch = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = cfg.optim.epochs * epoch
    lr_args = dict(
        base_value=cfg.optim.lr,
        final_value=cfg.optim.min_lr,
        total_iters=total,
        warmup_iters=cfg.optim.warmup_epochs * epoch,
        start_warmup_value=0,
    )
    last_layer_lr = CosineScheduler(**lr_args)
    last_layer_lr.schedule[: cfg.optim.freeze_last_layer_epochs * epoch] = 0
    warmup_temp_iters = cfg.teacher.warmup_teacher_temp_epochs * epoch
    return TrainingSchedules(
        lr=CosineScheduler(**lr_args),
        wd=CosineScheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        momentum=CosineScheduler(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total),
        teacher_temp=CosineScheduler(
            base_value=cfg.teacher.teacher_temp,
            final_value=cfg.teacher.teacher_temp,
            total_iters=warmup_temp_iters,
            warmup_iters=warmup_temp_iters,
            start_warmup_value=cfg.teacher.warmup_teacher_temp,
        ),
        last_layer_lr=last_layer_lr,
    )
