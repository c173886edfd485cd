"""The analytic FLOP count: against upstream's published per-step figures and against PyTorch's
own count of the matmuls the model really runs."""
import pytest
import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dinov2.configs import get_default_config
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.flops import CropGroup, StepShape, backbone_forward_flops, head_flops, training_step_flops


def _cfg(**overrides):
    cfg = get_default_config()
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))


def test_upstream_vitl14_step_matches_the_published_count():
    """../shared/anchors/gpu.md: upstream ViT-L/14, batch 64, 2 global 224 + 8 local 98, drop path
    0.3, 65,536 prototypes: 130.8 TFLOP nominal and 97.9 executed per step."""
    cfg = _cfg(**{"student.arch": "vit_large", "student.patch_size": 14})
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    # iBOT: half of the 128 teacher crops masked, ratios stratified over [0.1, 0.5] -> 0.3 of 256 on average
    masked = round(64 * 0.3 * 256)
    shape = StepShape(
        student_crops=(CropGroup(128, 224), CropGroup(512, 98)),
        teacher_crops=(CropGroup(128, 224),),
        masked_tokens=masked,
    )
    flops = training_step_flops(model, shape)
    assert flops.nominal / 1e12 == pytest.approx(130.8, rel=3e-3)
    assert flops.executed / 1e12 == pytest.approx(97.9, rel=3e-3)


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.5])
def test_forward_count_equals_what_pytorch_counts(tiny_vit, one_thread, drop_path_rate):
    """Linear layers, attention and patch embedding as torch's FlopCounterMode sees them run; with
    drop path above the subset threshold only the executed count matches (fewer samples run)."""
    cfg = _cfg(**{
        "student.arch": tiny_vit, "student.patch_size": 14, "student.num_register_tokens": 2,
        "student.drop_path_rate": drop_path_rate, "dino.head_n_prototypes": 128,
        "dino.head_hidden_dim": 64, "dino.head_bottleneck_dim": 32,
    })
    model = SSLMetaArch(cfg).train()
    backbone, head = model.student["backbone"], model.student["dino_head"]
    crops = [torch.randn(6, 3, 56, 56), torch.randn(10, 3, 28, 28)]
    # the math kernel runs attention as two batched matmuls, which the counter sees
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        outputs = backbone(crops, is_training=True)
        head(torch.cat([out["x_norm_clstoken"] for out in outputs]))
    analytic = backbone_forward_flops(backbone, [CropGroup(6, 56), CropGroup(10, 28)], training=True)
    analytic = analytic + head_flops([(head, 16)])
    assert counter.get_total_flops() == pytest.approx(analytic.executed, rel=1e-9)
    if drop_path_rate == 0.0:
        assert analytic.executed == analytic.nominal
    else:
        assert analytic.executed < 0.65 * analytic.nominal  # blocks run on half the crops


def test_teacher_counts_forward_only_and_the_student_three_times(tiny_vit):
    cfg = _cfg(**{"student.arch": tiny_vit, "student.patch_size": 14, "student.drop_path_rate": 0.0,
                  "dino.head_n_prototypes": 64, "dino.head_hidden_dim": 32, "dino.head_bottleneck_dim": 16})
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    globals_only = StepShape((CropGroup(4, 56),), (CropGroup(4, 56),), masked_tokens=0)
    step = training_step_flops(model, globals_only)
    one_forward = backbone_forward_flops(model.student["backbone"], [CropGroup(4, 56)], training=False)
    one_forward = one_forward + head_flops([(model.student["dino_head"], 4)])
    assert step.nominal == pytest.approx(4 * one_forward.nominal)
