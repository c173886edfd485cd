"""Self-supervised losses: DINO (class tokens), iBOT (masked patches), KoLeo (feature spread)."""
from dinov2.loss.dino_clstoken_loss import DINOLoss
from dinov2.loss.ibot_patch_loss import iBOTPatchLoss
from dinov2.loss.koleo_loss import KoLeoLoss

__all__ = ["DINOLoss", "iBOTPatchLoss", "KoLeoLoss"]
