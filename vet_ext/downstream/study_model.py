"""Study-level diagnosis: one prediction from all the views of a radiograph study.

A finding is a property of the animal, not of one projection: an effusion may be plain on the
ventro-dorsal view and doubtful on the lateral. `StudyEncoder` sends every view through the same
ViT, tells it which projection it is looking at (a learned view-type embedding added to the
view's tokens before the first block), and fuses the views' tokens into one study embedding.
Studies come with whatever views were taken, so the fusion has no notion of view order and
ignores absent (padding) views: the same study gives the same answer however its views are
listed or padded.

`ImageLevelBaseline` is what a study model has to beat: a per-image linear head on the same
backbone's [CLS] token, trained on every image with its study's labels, whose predictions are
averaged over the study's views.

Both models split the work the same way: `view_features` (the costly ViT pass, once per view)
then `probabilities` / `supervised_logits` (cheap), so an evaluation can re-run the fusion on
many subsets of a study's views without running the ViT again.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.utils.errors import UserError
from vet_ext.ingestion.views import VIEW_CODES

FUSIONS = ("mean", "transformer")
HEAD_INIT_STD = 0.01  # as vet_ext.downstream.finetune's linear head
EMBEDDING_INIT_STD = 0.02  # as the backbone's positional embedding
CHANNELS_PER_HEAD = 64  # the fusion transformer's heads are DINOv2-sized by default


def backbone_tokens(
    backbone: DinoVisionTransformer, images: Tensor, token_offset: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(normalised [CLS] [N, D], mean of the normalised patch tokens [N, D]) of images [N, 3, H, W].

    `token_offset` [N, D] is added to the [CLS] and patch tokens of each image after the patch
    embedding and positions, before the first block (registers are left alone, as they carry no
    position either). This is `forward_features` with one extra addition, written out here so
    the backbone stays a plain DINOv2 model whose weights load anywhere.
    """
    tokens = backbone.prepare_tokens_with_masks(images)
    first_patch = 1 + backbone.num_register_tokens
    if token_offset is not None:
        offset = token_offset[:, None, :].to(tokens.dtype)
        tokens = torch.cat(
            (tokens[:, :1] + offset, tokens[:, 1:first_patch], tokens[:, first_patch:] + offset), dim=1
        )
    for block in backbone.blocks:
        tokens = block(tokens)
    tokens = backbone.norm(tokens)
    return tokens[:, 0], tokens[:, first_patch:].mean(dim=1)


def check_study_batch(images: Tensor, view_codes: Tensor, present: Tensor) -> None:
    """Shapes agree and every study has a view: a study without one has nothing to predict from."""
    if images.ndim != 5 or images.shape[:2] != present.shape or view_codes.shape != present.shape:
        raise ValueError(
            f"expected images [B, V, C, H, W] with view codes and present mask [B, V]; got "
            f"{tuple(images.shape)}, {tuple(view_codes.shape)}, {tuple(present.shape)}"
        )
    if present.dtype != torch.bool:
        raise ValueError(f"the present mask must be boolean, got {present.dtype}")
    if not bool(present.any(dim=1).all()):
        raise ValueError("every study of the batch needs at least one present view")


def scatter_views(values: Tensor, present: Tensor) -> Tensor:
    """Values of the present views [N, ...] back into padded per-study slots [B, V, ...] (zeros elsewhere)."""
    slots = values.new_zeros((*present.shape, *values.shape[1:]))
    slots[present] = values
    return slots


def init_linear_head(head: nn.Linear) -> nn.Linear:
    nn.init.normal_(head.weight, std=HEAD_INIT_STD)
    nn.init.zeros_(head.bias)
    return head


class MeanFusion(nn.Module):
    """Study embedding = mean [CLS] token of the present views (no parameters)."""

    def forward(self, features: Tensor, present: Tensor) -> Tensor:
        weights = present.to(features.dtype)[..., None]
        return (features[:, :, 0] * weights).sum(dim=1) / weights.sum(dim=1)


class TransformerFusion(nn.Module):
    """A small transformer over every view's [CLS] and mean patch token plus a learned study token.

    There is no positional embedding across views, only a token-type one ([CLS] vs patch mean),
    so the output does not depend on the order of the views; absent views are masked out of
    attention. The study embedding is the normalised output of the study token.
    """

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        if depth < 1:
            raise UserError(f"fusion depth must be at least 1, got {depth}")
        if heads < 1 or dim % heads:
            raise UserError(f"fusion heads must divide the embedding width {dim}, got {heads}")
        self.study_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.token_type = nn.Parameter(torch.zeros(1, 1, 2, dim))
        nn.init.trunc_normal_(self.study_token, std=EMBEDDING_INIT_STD)
        nn.init.trunc_normal_(self.token_type, std=EMBEDDING_INIT_STD)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: Tensor, present: Tensor) -> Tensor:
        batch = features.shape[0]
        view_tokens = (features + self.token_type.to(features.dtype)).flatten(1, 2)  # [B, 2V, D]
        tokens = torch.cat((self.study_token.to(features.dtype).expand(batch, -1, -1), view_tokens), dim=1)
        ignored = torch.cat((present.new_zeros(batch, 1), ~present.repeat_interleave(2, dim=1)), dim=1)
        return self.norm(self.encoder(tokens, src_key_padding_mask=ignored)[:, 0])


class StudyEncoder(nn.Module):
    """ViT per view with a view-type embedding, then fusion over the present views, then a linear head.

    Input: padded images [B, V, 3, H, W], view codes [B, V] (indices into `view_codes`, UNKNOWN
    included) and a present mask [B, V]. Output: multi-label logits [B, n_labels].
    """

    def __init__(
        self,
        backbone: DinoVisionTransformer,
        n_labels: int,
        fusion: str = "mean",
        view_codes: Sequence[str] = VIEW_CODES,
        fusion_depth: int = 2,
        fusion_heads: int | None = None,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise UserError(f"fusion must be one of {', '.join(FUSIONS)}, got '{fusion}'")
        dim = backbone.embed_dim
        self.backbone = backbone
        self.view_codes = tuple(view_codes)
        self.fusion_name = fusion
        self.view_embedding = nn.Embedding(len(self.view_codes), dim)
        nn.init.trunc_normal_(self.view_embedding.weight, std=EMBEDDING_INIT_STD)
        if fusion == "mean":
            self.fusion: nn.Module = MeanFusion()
        else:
            heads = fusion_heads if fusion_heads is not None else max(1, dim // CHANNELS_PER_HEAD)
            self.fusion = TransformerFusion(dim, fusion_depth, heads)
        self.head = init_linear_head(nn.Linear(dim, n_labels))

    def view_features(self, images: Tensor, view_codes: Tensor, present: Tensor) -> Tensor:
        """[B, V, 2, D]: ([CLS], mean patch token) of every present view; absent slots are zeros.

        Only present views go through the ViT, so padding costs nothing and cannot leak in.
        """
        check_study_batch(images, view_codes, present)
        cls, patch_mean = backbone_tokens(self.backbone, images[present], self.view_embedding(view_codes[present]))
        return scatter_views(torch.stack((cls, patch_mean), dim=1), present)

    def classify(self, features: Tensor, present: Tensor) -> Tensor:
        return self.head(self.fusion(features, present))

    def forward(self, images: Tensor, view_codes: Tensor, present: Tensor) -> Tensor:
        return self.classify(self.view_features(images, view_codes, present), present)

    def supervised_logits(self, features: Tensor, present: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, targets) the BCE loss compares: one row per study."""
        return self.classify(features, present), targets

    def probabilities(self, features: Tensor, present: Tensor) -> Tensor:
        return self.classify(features, present).float().sigmoid()


class ImageLevelBaseline(nn.Module):
    """Per-image linear head on the backbone's [CLS]; a study's prediction is the mean over its views.

    Trained image by image (each image with its study's labels); it knows nothing of view types
    or of the other views, which is the point of a baseline.
    """

    def __init__(self, backbone: DinoVisionTransformer, n_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = init_linear_head(nn.Linear(backbone.embed_dim, n_labels))

    def view_features(self, images: Tensor, view_codes: Tensor, present: Tensor) -> Tensor:
        """[B, V, 2, D] as `StudyEncoder.view_features`, without view-type information."""
        check_study_batch(images, view_codes, present)
        cls, patch_mean = backbone_tokens(self.backbone, images[present])
        return scatter_views(torch.stack((cls, patch_mean), dim=1), present)

    def view_logits(self, features: Tensor) -> Tensor:
        """[B, V, n_labels] logits of every view slot (meaningless for absent ones)."""
        return self.head(features[:, :, 0])

    def forward(self, images: Tensor, view_codes: Tensor, present: Tensor) -> Tensor:
        return self.view_logits(self.view_features(images, view_codes, present))

    def supervised_logits(self, features: Tensor, present: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, targets) the BCE loss compares: one row per present image, with its study's targets."""
        per_view_targets = targets[:, None, :].expand(*present.shape, targets.shape[-1])
        return self.view_logits(features)[present], per_view_targets[present]

    def probabilities(self, features: Tensor, present: Tensor) -> Tensor:
        weights = present.float()[..., None]
        return (self.view_logits(features).float().sigmoid() * weights).sum(dim=1) / weights.sum(dim=1)
