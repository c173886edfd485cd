"""bench/levers.py's bookkeeping: one lever at a time against one baseline, and only what pays combined."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import levers  # noqa: E402


@pytest.fixture
def fake_measure(monkeypatch):
    """Step times by the lever options a run gets: compile pays 20 %, fused AdamW 0.5 %, xformers costs."""
    calls = []

    def measure(args, arch, mode, opts, env):
        calls.append((tuple(opts), dict(env)))
        step = 100.0
        if "train.compile=true" in opts:
            step *= 0.8
        if "optim.fused_adamw=true" in opts:
            step *= 0.995
        if env.get("DINOV2_ATTENTION") == "xformers":
            return {"step_ms": None, "note": "NotImplementedError"}
        return {"step_ms": step, "peak_gib": 10.0}

    monkeypatch.setattr(levers, "measure", measure)
    return calls


def test_each_lever_alone_then_the_ones_that_pay_together(fake_measure):
    args = levers.get_args_parser().parse_args(["--levers", "compile", "fused_adamw", "xformers"])
    rows = levers.lever_rows(args, "vit_base", "multiview", progress=lambda line: None)
    by_lever = {row["lever"]: row for row in rows}
    assert by_lever["compile"]["effect_pct"] == pytest.approx(-20.0)
    assert by_lever["compile"]["decision"] == "keep"
    assert by_lever["fused_adamw"]["decision"] == "drop"  # 0.5 % is under the 1 % threshold
    assert by_lever["xformers"]["effect_pct"] is None and by_lever["xformers"]["decision"] == "drop"
    assert by_lever["final (compile)"]["effect_pct"] == pytest.approx(-20.0)
    # every lever run starts from the baseline's options: one change at a time
    baseline_opts = set(levers.BASELINE.opts)
    for opts, env in fake_measure[1:]:
        changed = [o for o in opts if o not in baseline_opts]
        assert len(changed) <= 1
    assert all(o in fake_measure[1][0] for o in baseline_opts)
