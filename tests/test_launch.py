"""What users trip on when they start a run: flags and overrides in either order, the SLURM
variables of a multi-node allocation becoming one process group, the rendezvous port, and the
shell scripts under slurm/ being executable."""
import importlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from dinov2 import distributed
from dinov2.distributed import SLURM_MASTER_PORTS, launch_environment, slurm_master_port
from dinov2.utils.config import get_cfg_from_args

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

# Values with `=` and a leading `-` stay single overrides.
OVERRIDES = ["train.dataset_path=ImageFolder:root=/data/a=b", "optim.min_lr=-1.0e-06", "train.seed=7"]


def _parser(entry_point: str):
    return importlib.import_module(entry_point).get_args_parser()


# Every command that takes key=value overrides, with a flag it has that takes a value.
ENTRY_POINTS = {
    "dinov2.train.train": ["--output-dir", "OUT"],
    "dinov2.run.train.train": ["--output-dir", "OUT", "--nodes", "2"],
    "vet_ext.demo": ["--out", "OUT"],
    "view_invariance": ["--out", "OUT"],
    "train_step": ["--out", "OUT"],
    "levers": ["--out", "OUT"],
}


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_overrides_before_between_or_after_the_flags(entry_point):
    flags = ENTRY_POINTS[entry_point]
    parser = _parser(entry_point)
    orders = [
        [*flags, *OVERRIDES],
        [*OVERRIDES, *flags],
        [OVERRIDES[0], *flags[:2], OVERRIDES[1], *flags[2:], OVERRIDES[2]],
    ]
    parsed = [parser.parse_args(argv) for argv in orders]
    assert all(args == parsed[0] for args in parsed)
    assert parsed[0].opts == OVERRIDES


def test_both_orders_give_the_same_training_config():
    parser = _parser("dinov2.train.train")
    config = str(REPO / "dinov2" / "configs" / "train" / "vits14_cpu_smoke.yaml")
    upstream_order = parser.parse_args(["--config-file", config, "--output-dir", "OUT", *OVERRIDES])
    flags_last = parser.parse_args(["--config-file", config, *OVERRIDES, "--output-dir", "OUT"])
    assert flags_last.output_dir == "OUT"
    cfg = get_cfg_from_args(flags_last)
    assert cfg == get_cfg_from_args(upstream_order)
    assert (cfg.train.dataset_path, cfg.optim.min_lr, cfg.train.seed) == ("ImageFolder:root=/data/a=b", -1e-6, 7)


@pytest.mark.parametrize("argv, named", [
    (["train.seed=7", "--bogus"], "--bogus"),
    (["--output-dir", "OUT", "train.seed=7", "OUT2"], "OUT2"),  # a word that is neither a flag nor key=value
])
@pytest.mark.parametrize("entry_point", ["dinov2.train.train", "dinov2.run.train.train"])
def test_unknown_argument_is_one_error_naming_it(entry_point, argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser(entry_point).parse_args(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"unrecognized arguments: {named}" in errors[0]


def test_launcher_command_with_flags_after_overrides_submits_them(monkeypatch, tmp_path):
    """`python -m dinov2.run.train.train ... train.seed=7 --output-dir OUT --nodes 2`: both flags reach
    the job, the override reaches the training, nothing is submitted for real."""
    from dinov2.run.train import train as launcher

    config = tmp_path / "c.yaml"
    config.write_text("train:\n  seed: 3\n")
    submitted = {}
    monkeypatch.setattr(launcher, "submit_jobs", lambda task, args, name: submitted.update(args=args))
    assert launcher.main(["--config-file", str(config), "train.seed=7", "--output-dir", str(tmp_path / "out"), "--nodes", "2"]) == 0
    args = submitted["args"]
    assert (args.nodes, args.output_dir, args.opts) == (2, str(tmp_path / "out"), ["train.seed=7"])


# --- SLURM: 2 nodes x 4 tasks -------------------------------------------------------------------

JOB_ID = 918273
NODES = ("gpu017", "gpu018")
TASKS_PER_NODE = 4


def slurm_task_environment(node: int, local: int) -> dict[str, str]:
    """What srun sets for one task of `sbatch --nodes 2 --ntasks-per-node 4 --gpus-per-node 4`."""
    return {
        "SLURM_JOB_ID": str(JOB_ID),
        "SLURM_JOBID": str(JOB_ID),
        "SLURM_JOB_NODELIST": "gpu[017-018]",
        "SLURM_NODELIST": "gpu[017-018]",
        "SLURM_STEP_NODELIST": "gpu[017-018]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": str(len(NODES) * TASKS_PER_NODE),
        "SLURM_NPROCS": str(len(NODES) * TASKS_PER_NODE),
        "SLURM_STEP_NUM_TASKS": str(len(NODES) * TASKS_PER_NODE),
        "SLURM_TASKS_PER_NODE": f"{TASKS_PER_NODE}(x2)",
        "SLURM_NTASKS_PER_NODE": str(TASKS_PER_NODE),
        "SLURM_GPUS_ON_NODE": str(TASKS_PER_NODE),
        "SLURM_STEP_ID": "0",
        "SLURM_NODEID": str(node),
        "SLURMD_NODENAME": NODES[node],
        "SLURM_PROCID": str(node * TASKS_PER_NODE + local),
        "SLURM_LOCALID": str(local),
    }


ALLOCATION = [(node, local) for node in range(len(NODES)) for local in range(TASKS_PER_NODE)]


def test_every_task_of_a_two_node_allocation_agrees_on_the_rendezvous():
    launches = {(node, local): launch_environment(slurm_task_environment(node, local)) for node, local in ALLOCATION}
    assert {(launch.master_addr, launch.master_port, launch.world_size) for launch in launches.values()} == {
        ("gpu017", slurm_master_port(JOB_ID), 8)
    }
    assert sorted(launch.rank for launch in launches.values()) == list(range(8))
    for node in range(len(NODES)):
        assert sorted(launches[node, local].local_rank for local in range(TASKS_PER_NODE)) == [0, 1, 2, 3]


def test_enable_joins_one_group_from_slurm_variables(monkeypatch):
    """Each task passes the same group to torch and exports torchrun's variables for other code."""
    joined, devices = [], []
    monkeypatch.setattr(distributed, "is_enabled", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: joined.append(kwargs))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: TASKS_PER_NODE)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    exported = []
    for node, local in ALLOCATION:
        with mock.patch.dict(os.environ):  # the whole environment is restored afterwards
            for name in [name for name in os.environ if name.startswith("SLURM") or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")]:
                del os.environ[name]
            os.environ.update(slurm_task_environment(node, local))
            assert distributed.enable()
            exported.append({name: os.environ[name] for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")})
    assert [(kwargs["backend"], kwargs["init_method"], kwargs["world_size"]) for kwargs in joined] == [("nccl", "env://", 8)] * 8
    assert [kwargs["rank"] for kwargs in joined] == list(range(8))
    assert devices == [0, 1, 2, 3, 0, 1, 2, 3]
    assert {(env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) for env in exported} == {
        ("8", "gpu017", str(slurm_master_port(JOB_ID)))
    }
    assert [(env["RANK"], env["LOCAL_RANK"]) for env in exported] == [(str(r), str(r % 4)) for r in range(8)]


def test_slurm_port_is_below_the_ephemeral_range_and_differs_between_jobs():
    """Linux hands out 32768-60999 (net.ipv4.ip_local_port_range) to outgoing connections."""
    assert SLURM_MASTER_PORTS.start >= 1024 and SLURM_MASTER_PORTS.stop <= 32768
    ports = [slurm_master_port(job_id) for job_id in range(10**6, 10**6 + len(SLURM_MASTER_PORTS))]
    assert len(set(ports)) == len(SLURM_MASTER_PORTS)  # consecutive jobs, which may share a node, never collide
    assert all(port in SLURM_MASTER_PORTS for port in ports)
    assert slurm_master_port(2**40 + 5) in SLURM_MASTER_PORTS


# --- slurm/ scripts ------------------------------------------------------------------------------

def _slurm_scripts() -> list[Path]:
    return sorted(path for pattern in ("*.sh", "*.sbatch") for path in (REPO / "slurm").glob(pattern))


def test_slurm_scripts_are_executable():
    """`./slurm/train_gpu.sbatch` and `sbatch slurm/...` both work from a fresh clone: git keeps the mode."""
    scripts = _slurm_scripts()
    assert scripts
    git = shutil.which("git")
    listed = subprocess.run([git, "ls-files", "-s", "slurm"], cwd=REPO, capture_output=True, text=True) if git else None
    if listed is not None and listed.returncode == 0 and listed.stdout.strip():
        modes = {REPO / line.split("\t")[1]: line.split()[0] for line in listed.stdout.splitlines()}
        assert {script.name: modes.get(script) for script in scripts} == {script.name: "100755" for script in scripts}
    else:  # an unpacked archive, not a git checkout
        assert all(script.stat().st_mode & stat.S_IXUSR for script in scripts), scripts
