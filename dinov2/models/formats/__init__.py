"""Other libraries' layouts of a DINOv2 backbone: `transformers`, `timm`, plain safetensors.

Each format module maps upstream's flat state dict (the one `dinov2_vit*14_pretrain.pth` holds) to
its library's keys and back, so the architecture facts live in one place (`spec.BackboneSpec`)
and every format is a renaming of the same tensors, never a re-implementation of the model.
"""
