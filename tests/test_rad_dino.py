"""Continuing pretraining from RAD-DINO's release: its folder loads as weights, its DINO head too.

The folder is made here with the public release's file names (config.json, model.safetensors,
preprocessor_config.json, backbone_compatible.safetensors, dino_head.safetensors), key names and
config fields, random values, and a tiny width and depth instead of ViT-B/14 (64 wide, 2 blocks,
2 heads, 56 px; head 64 -> 256 -> 256 -> 64 -> 1024 prototypes instead of 768 -> 2048 -> 2048 ->
256 -> 65536, which is what the release's 92.6 MB head file holds in float32).
"""
import json
from pathlib import Path

import pytest
import torch

from dinov2.eval.setup import load_backbone
from dinov2.layers import DINOHead
from dinov2.models.formats import hf
from dinov2.models.formats.files import write_safetensors
from dinov2.models.formats.spec import backbone_spec, flat_block_keys
from dinov2.train import train as train_module
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import setup
from dinov2.utils.errors import UserError
from test_formats import IMG, make_backbone

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "dinov2" / "configs" / "train" / "vits14_cpu_smoke.yaml"
RUN = ["student.arch=vit_test_tiny", "train.batch_size_per_gpu=4", "train.OFFICIAL_EPOCH_LENGTH=1", "optim.epochs=3",
       "optim.warmup_epochs=1", "train.log_period_iterations=1", "train.head_warmup_iterations=0"]  # fmt: skip
HEAD = dict(in_dim=64, out_dim=1024, hidden_dim=256, bottleneck_dim=64, nlayers=3)  # the smoke config's dino head

pytestmark = pytest.mark.usefixtures("tiny_vit")


def rad_dino_config(depth: int) -> dict:
    """microsoft/rad-dino's config.json fields, at the tiny size."""
    return {
        "apply_layernorm": True, "architectures": ["Dinov2Model"], "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0, "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 64,
        "image_size": IMG, "initializer_range": 0.02, "layer_norm_eps": 1e-06, "layerscale_value": 1.0,
        "mlp_ratio": 4, "model_type": "dinov2", "num_attention_heads": 2, "num_channels": 3,
        "num_hidden_layers": depth, "out_features": [f"stage{depth}"], "out_indices": [depth], "patch_size": 14,
        "qkv_bias": True, "reshape_hidden_states": True, "stage_names": ["stem"] + [f"stage{i + 1}" for i in range(depth)],
        "torch_dtype": "float32", "transformers_version": "4.40.0", "use_swiglu_ffn": False,
    }  # fmt: skip


@pytest.fixture
def rad_dino(tmp_path) -> tuple[Path, torch.nn.Module, dict]:
    """(folder, the backbone it holds, the head's state dict)."""
    backbone = make_backbone("plain", interpolate_offset=0.1)
    head = DINOHead(**HEAD)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)  # not the init value, so a load shows
    folder = tmp_path / "rad-dino"
    state = flat_block_keys(backbone.state_dict())
    write_safetensors(folder / "model.safetensors", hf.to_hf(state, backbone_spec(backbone)))
    write_safetensors(folder / "backbone_compatible.safetensors", state)
    write_safetensors(folder / "dino_head.safetensors", head.state_dict())  # keys mlp.0/2/4.*, last_layer.weight_g/v
    (folder / "config.json").write_text(json.dumps(rad_dino_config(backbone.n_blocks)))
    (folder / "preprocessor_config.json").write_text(json.dumps(hf.preprocessor_config((0.5307,) * 3, (0.2583,) * 3, IMG, IMG)))
    return folder, backbone, head.state_dict()


def test_the_folder_opens_as_weights_with_its_config(rad_dino):
    folder, backbone, _ = rad_dino
    model = load_backbone(None, str(folder))
    assert model.num_heads == 2 and model.patch_size == 14  # from config.json, not guessed from the keys
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(model.forward_features(images)["x_norm_clstoken"], backbone.forward_features(images)["x_norm_clstoken"])


def test_model_safetensors_alone_gives_the_same_backbone(rad_dino):
    folder, _, _ = rad_dino
    compatible = load_backbone(None, str(folder)).state_dict()
    (folder / "backbone_compatible.safetensors").unlink()
    from_transformers = load_backbone(None, str(folder)).state_dict()
    assert all(torch.equal(from_transformers[key], value) for key, value in compatible.items())


def _cfg(tmp_path, *opts):
    return setup(train_module.get_args_parser().parse_args(
        ["--config-file", str(SMOKE), "--output-dir", str(tmp_path / "run"), *RUN, *opts]))  # fmt: skip


@pytest.mark.parametrize("prefixed", [False, True], ids=["plain_keys", "dino_head_prefixed"])
def test_pretrained_weights_load_backbone_and_head_into_student_and_teacher(tmp_path, rad_dino, prefixed):
    folder, backbone, head = rad_dino
    if prefixed:
        write_safetensors(folder / "dino_head.safetensors", {f"dino_head.{k}": v for k, v in head.items()})
    model = SSLMetaArch(_cfg(tmp_path, f"student.pretrained_weights={folder}"))
    for module in (model.student, model.teacher):
        assert all(torch.equal(module.dino_head.state_dict()[k], v) for k, v in head.items())
        assert torch.equal(module.backbone.pos_embed, backbone.pos_embed)


def test_a_head_of_other_dimensions_is_refused_naming_the_config_keys(tmp_path, rad_dino):
    folder, _, _ = rad_dino
    with pytest.raises(UserError, match=r"dino_head does not fit the configured head \(dino.head_n_prototypes.*last_layer"):
        SSLMetaArch(_cfg(tmp_path, f"student.pretrained_weights={folder}", "dino.head_n_prototypes=512"))


@pytest.mark.slow
def test_pretraining_continues_from_the_release_without_head_warmup(tmp_path, rad_dino):
    folder, backbone, head = rad_dino
    trainer = train_module.Trainer(_cfg(tmp_path, f"student.pretrained_weights={folder}"))
    summary = trainer.train(trainer.resume_or_load(resume=True))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "training_metrics.json").read_text().splitlines()]
    assert len(metrics) == 3 and all(torch.isfinite(torch.tensor(m["total_loss"])) for m in metrics), summary
    student = trainer.model.student
    # no warm-up: the backbone learns from the start (iteration 0 has lr 0 in the warm-up ramp)
    assert not torch.equal(student.backbone.cls_token, backbone.cls_token)
    assert not torch.equal(student.dino_head.state_dict()["mlp.0.weight"], head["mlp.0.weight"])
