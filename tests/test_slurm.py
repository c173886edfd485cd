"""The SLURM launcher on a real (local, one-node) SLURM cluster: a 2-task CPU training that is
cancelled after its first checkpoint, relaunched, then preempted (submitit's signal) and requeued,
ends with every iteration logged once and its final checkpoint."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_vit_run import GLOBAL_BATCH, SMOKE, TESTS, REPO, TINY_RUN, TinyTrainer  # noqa: E402

from dinov2.run.submit import executor_parameters, submit_jobs  # noqa: E402
from dinov2.run.train.train import get_args_parser  # noqa: E402

ITERATIONS = 300
RUN = [*TINY_RUN, f"train.OFFICIAL_EPOCH_LENGTH={ITERATIONS // 2}", "optim.epochs=2",
       "train.checkpoint_period_iterations=100", f"evaluation.eval_period_iterations={ITERATIONS}",
       f"train.batch_size_per_gpu={GLOBAL_BATCH // 2}"]
CLUSTER = ["bash", str(REPO / "slurm" / "local_cluster.sh")]


@pytest.fixture(scope="module")
def cluster():
    """The local cluster's partition; the cluster is stopped afterwards if this fixture started it."""
    was_up = subprocess.run([*CLUSTER, "status"], capture_output=True).returncode == 0
    proc = subprocess.run([*CLUSTER, "start"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
        pytest.skip(f"local SLURM cluster unavailable: {reason}")
    yield "debug"
    if not was_up:
        subprocess.run([*CLUSTER, "stop"], capture_output=True)


def submit(partition: str, output_dir: Path, monkeypatch):
    """The launcher's own submission path, with the tiny ViT importable in the job."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # sbatch exports the submitting environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = get_args_parser().parse_args([
        "--ngpus", "0", "--ntasks-per-node", "2", "--cpus-per-task", "1", "--partition", partition, "--timeout", "10",
        "--config-file", str(SMOKE), "--output-dir", str(output_dir), *RUN])
    return submit_jobs(TinyTrainer(args), args, name="dinov2:test")


def wait_for(condition, what: str, timeout: float = 90.0, job=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(Path(job.paths.folder).glob("*.err"))) if job else ""
    pytest.fail(f"timed out waiting for {what}{logs}")


def job_gone(job_id: str) -> bool:
    return subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip() == ""


def job_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def node_idle() -> bool:
    return subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.strip() == "idle"


def resumed_iterations(output_dir: Path) -> list[int]:
    return [int(m) for m in re.findall(r"resumed from .* \(iteration (\d+)\)", (output_dir / "logs" / "log.txt").read_text())]


def test_launcher_flags_become_slurm_parameters(monkeypatch):
    monkeypatch.delenv("SLURM_PARTITION", raising=False)
    cpu = get_args_parser().parse_args(["--ngpus", "0", "--ntasks-per-node", "3", "--nodes", "2", "--qos", "high",
                                        "--account", "vet", "--nodelist", "n[1-2]", "--config-file", "c.yaml"])
    params = executor_parameters(cpu, "dinov2:train")
    assert (params["nodes"], params["tasks_per_node"], params["cpus_per_task"]) == (2, 3, 10)
    assert "gpus_per_node" not in params and "slurm_partition" not in params
    assert params["slurm_additional_parameters"] == {"qos": "high", "account": "vet", "nodelist": "n[1-2]"}
    assert params["slurm_signal_delay_s"] == 120 and params["timeout_min"] == 2800
    gpu = get_args_parser().parse_args(["--gpus", "4", "--partition", "learn", "--use-volta32", "--config-file", "c.yaml"])
    params = executor_parameters(gpu, "dinov2:train")
    assert (params["tasks_per_node"], params["gpus_per_node"], params["slurm_partition"]) == (4, 4, "learn")
    assert params["slurm_additional_parameters"] == {"constraint": "volta32gb"}


EVAL_FLAGS = {
    "knn": ["--nb_knn", "5"],
    "linear": ["--epochs", "1", "--epoch-length", "4", "--eval-period-iterations", "4", "--learning-rates", "0.01",
               "--batch-size", "16"],
    "log_regression": ["--c-grid-size", "2", "--max-train-iters", "50"],
}


@pytest.mark.parametrize("command", sorted(EVAL_FLAGS))
@pytest.mark.slow
def test_evaluation_launchers_run_their_command_on_slurm(cluster, tmp_path, monkeypatch, command):
    """`python -m dinov2.run.eval.<command>`: upstream's three launchers, each a job that writes its results."""
    import importlib

    import torch

    from tiny import INFERRED_HEADS, make_tiny_vit

    torch.manual_seed(0)
    backbone = make_tiny_vit(img_size=56, patch_size=14, num_heads=INFERRED_HEADS)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")  # a hub-style file: architecture inferred
    submitted = {}
    launcher = importlib.import_module(f"dinov2.run.eval.{command}")
    monkeypatch.setattr("dinov2.run.eval.launcher.submit_jobs",
                        lambda task, args, name: submitted.update(job=submit_jobs(task, args, name), name=name))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    assert launcher.main([
        "--ngpus", "0", "--cpus-per-task", "1", "--partition", cluster, "--timeout", "10",
        "--pretrained-weights", str(tmp_path / "backbone.pth"), "--output-dir", str(out),
        "--train-dataset", "Synthetic:n=48:size=56", "--val-dataset", "Synthetic:n=24:size=56",
        "--crop-size", "56", "--num-workers", "0", *EVAL_FLAGS[command],
    ]) == 0
    assert submitted["name"] == f"dinov2:{'logreg' if command == 'log_regression' else command}"
    job = submitted["job"]
    wait_for(lambda: job_gone(job.job_id), f"the {command} job to end", timeout=180, job=job)
    results = json.loads((out / "results.json").read_text())
    assert results and all(section["rows"] for section in results.values())


@pytest.mark.slow
def test_cancelled_then_preempted_training_resumes_and_loses_nothing(cluster, tmp_path, monkeypatch):
    out = tmp_path / "run"
    pointer = out / "last_checkpoint.rank_0"
    started = time.monotonic()

    first = submit(cluster, out, monkeypatch)
    wait_for(pointer.exists, "the first checkpoint", job=first)
    # SIGTERM (ignored by submitit tasks), then SIGKILL KillWait (2 s here) later: a hard stop
    subprocess.run(["scancel", first.job_id], check=True)
    wait_for(lambda: job_gone(first.job_id), "the cancelled job to end", job=first)
    kept = pointer.read_text()
    assert kept != "model_final.rank_0.pth", "the run ended before it was cancelled"
    kept_iteration = int(kept.split("_")[1].split(".")[0])

    second = submit(cluster, out, monkeypatch)
    wait_for(lambda: len(resumed_iterations(out)) == 1, "the relaunched job to resume", job=second)
    assert resumed_iterations(out) == [kept_iteration]
    second._interrupt()  # submitit's preemption signal: checkpoint now, requeue
    # slurmctld holds a requeued job for 2 minutes; once the old run is gone from the node and
    # slurmd's credential window (AuthInfo=cred_expire=10 in local_cluster.sh) has passed, release it
    wait_for(lambda: job_state(second.job_id) == "PENDING" and node_idle(), "the job to be requeued", job=second)
    time.sleep(12)
    release = subprocess.run(["scontrol", "update", f"JobId={second.job_id}", "StartTime=now"], capture_output=True, text=True)
    # on a loaded machine the hold may have run out first: the job then started by itself
    assert release.returncode == 0 or "no longer pending" in release.stderr, release.stderr
    wait_for(lambda: len(resumed_iterations(out)) == 2, "the requeued job to resume", timeout=120, job=second)
    stopped_at = resumed_iterations(out)[1]
    assert stopped_at > kept_iteration and (stopped_at + 1) % 100 != 0  # saved at the signal, not periodically
    wait_for(lambda: (out / "model_final.rank_0.pth").exists() and job_gone(second.job_id), "the end of training",
             timeout=120, job=second)

    lines = [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == list(range(ITERATIONS))
    assert pointer.read_text() == "model_final.rank_0.pth"
    print(f"\nlocal SLURM: cancelled after checkpoint {kept}, preempted after iteration {stopped_at}, "
          f"{ITERATIONS} iterations in {time.monotonic() - started:.0f} s")
