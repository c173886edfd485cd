"""Pretraining data: studies from DATA/ -> multi-view crops -> the SSL batch dinov2 trains on."""
