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


@pytest.fixture
def xformers_installed(monkeypatch):
    """Whether bench/levers.py finds xformers, whatever this environment has."""
    real_find_spec = levers.importlib.util.find_spec

    def install(present: bool) -> None:
        monkeypatch.setattr(levers.importlib.util, "find_spec",
                            lambda name, *a: (object() if present else None) if name == "xformers" else real_find_spec(name, *a))
    return install


def test_each_lever_alone_then_the_ones_that_pay_together(fake_measure, xformers_installed):
    xformers_installed(True)
    args = levers.get_args_parser().parse_args(["--device", "cuda", "--levers", "compile", "fused_adamw", "xformers"])
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


@pytest.mark.parametrize("device, installed, reason", [("cuda", False, "xformers is not installed"),
                                                       ("cpu", True, "xformers has no CPU kernels")])
def test_xformers_lever_that_cannot_act_is_skipped_not_timed(fake_measure, xformers_installed, device, installed, reason):
    """Without xformers the attention would be PyTorch's in both runs: the baseline timed twice."""
    xformers_installed(installed)
    args = levers.get_args_parser().parse_args(["--device", device, "--levers", "xformers", "compile"])
    rows = levers.lever_rows(args, "vit_base", "multiview", progress=lambda line: None)
    skipped = next(row for row in rows if row["lever"] == "xformers")
    assert skipped["decision"] == "skipped" and skipped["note"] == f"skipped: {reason}"
    assert skipped["after_ms"] is None and skipped["effect_pct"] is None
    assert all(env.get("DINOV2_ATTENTION") != "xformers" for _, env in fake_measure)
    assert [row["lever"] for row in rows] == ["xformers", "compile", "final (compile)"]

