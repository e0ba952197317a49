"""The pieces of multi-process training that need no processes: the step plan for N ranks, how the
ranks' measurements combine, the `--nproc` launcher's command line, and the sweep executors'
placement of points on GPUs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lorafit.base.config import TrainConfig
from lorafit.base.errors import UserError
from lorafit.inputs.data import Sample
from lorafit.measurement.figures import RankFigures, StepTime, Timing
from lorafit.measurement.meter import combine_ranks
from lorafit.run.store import RunRecord
from lorafit.studies import sweep
from lorafit.training import distributed
from lorafit.training.setup import plan_steps


def samples(n: int) -> list[Sample]:
    return [Sample(list(range(5 + i % 7)), list(range(5 + i % 7))) for i in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_for_n_ranks_has_the_single_process_data_order(world):
    data = samples(23)  # 12 micro-batches of 2
    cfg = TrainConfig(model="random:tiny", batch_size=2, grad_accum=1, max_length=64)
    one = TrainConfig(model="random:tiny", batch_size=2, grad_accum=world, max_length=64)
    steps = plan_steps(cfg, data, 7, world)
    assert steps == [s for s in plan_steps(one, data, 7) if len(s) >= world]  # same batches, same steps
    for step in steps:
        dealt = [step[r::world] for r in range(world)]
        assert all(dealt) and sum(len(d) for d in dealt) == len(step)  # every rank >= 1, none lost


def test_plan_drops_a_last_step_smaller_than_the_world():
    cfg = TrainConfig(model="random:tiny", batch_size=2, grad_accum=2, max_length=64)
    steps = plan_steps(cfg, samples(10), 0, world=2)  # 5 micro-batches: a step of 4, then 1 < 2 ranks
    assert [len(s) for s in steps] == [4]
    assert plan_steps(cfg, samples(2), 0, world=2) == []  # fit() turns this into a clear error


def rank(host: str, device: str, energy: float | None, source: str | None, **kw) -> RankFigures:
    out = {
        "rank": 0, "host": host, "device": device, "tokens": 100, "loss_tokens": 60, "timed_s": 2.0,
        "tokens_per_s": 50.0, "train_tokens": 150, "train_s": 3.0, "peak_bytes": 10, "energy_j": energy,
        "energy_source": source, "energy_unavailable_reason": None if energy is not None else "no counter",
        "avg_power_w": 5.0, "peak_flops_per_s": 1e12,
    }  # fmt: skip
    out.update(kw)
    return RankFigures(**out)


RANK0_TIMING = Timing(timed_steps=3, warmup_steps=1, traced_steps=0, step_time_s=StepTime(0.5, 0.4), tokens=100)


def test_combine_ranks_adds_tokens_and_gpu_energy_and_counts_a_host_rapl_once():
    gpus = [
        rank("a", "cuda:0", 10.0, "nvml_total_energy"),
        rank("a", "cuda:1", 12.0, "nvml_total_energy", timed_s=2.5, train_s=3.5),
    ]
    out = combine_ranks(gpus, RANK0_TIMING)
    timing, energy = out.timing, out.energy
    assert timing.tokens == 200 and timing.loss_tokens == 120
    assert timing.timed_s == 2.5 and timing.tokens_per_s == 200 / 2.5  # the slowest rank sets the pace
    assert timing.train_tokens_per_s == 300 / 3.5
    assert timing.timed_steps == 3 and timing.step_time_s == StepTime(0.5, 0.4)  # rank 0's own
    assert energy.energy_j == 22.0 and energy.j_per_token == 22.0 / 200 and energy.energy_counters == 2
    assert out.peak_flops_per_s == 2e12 and energy.avg_power_w == 10.0

    cpus = [rank("a", "cpu", 30.0, "rapl"), rank("a", "cpu", 31.0, "rapl"), rank("b", "cpu", 20.0, "rapl")]
    energy = combine_ranks(cpus, RANK0_TIMING).energy
    assert energy.energy_counters == 2  # host a's package once, host b's once
    assert energy.energy_j in (50.0, 51.0)


def test_combine_ranks_reports_null_energy_with_the_reason_if_any_rank_lacks_it():
    ranks = [rank("a", "cuda:0", 10.0, "nvml_total_energy"), rank("a", "cuda:1", None, None)]
    energy = combine_ranks(ranks, RANK0_TIMING).energy
    assert energy.energy_j is None and energy.j_per_token is None and energy.energy_counters is None
    assert energy.energy_unavailable_reason == "no counter"


def test_launcher_command_line_and_environment(monkeypatch):
    argv = ["train", "--nproc", "2", "--model", "random:tiny", "--nproc=3", "--out", "r"]
    assert distributed.strip_nproc(argv) == ["train", "--model", "random:tiny", "--out", "r"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert distributed.launch_env(4) == {"LORAFIT_NPROC": "4", "OMP_NUM_THREADS": "4"}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert distributed.launch_env(4) == {"LORAFIT_NPROC": "4"}  # the user's setting stands
    with pytest.raises(UserError, match="--nproc must be >= 1"):
        distributed.launch(0, argv)


@pytest.mark.parametrize("chosen", ["onednn", "blas"])
def test_a_cpu_launch_gives_every_rank_the_launchers_matmul_library(chosen, cpu_matmul, monkeypatch):
    """`auto` times both libraries (base.matmul): timed in each rank, two ranks could choose differently, and a
    resumed run differently from the run it resumes. The launcher chooses once, for all of them."""
    from lorafit.base import matmul

    cpu_matmul("auto")
    rates = {"blas": 300.0, "onednn": 600.0 if chosen == "onednn" else 200.0}
    monkeypatch.setattr(matmul, "probe", lambda: rates)
    assert distributed.launch_env(2, cpu=True)["LORAFIT_CPU_MATMUL"] == chosen
    assert "LORAFIT_CPU_MATMUL" not in distributed.launch_env(2)  # GPU ranks: lorafit's CPU products never run


def test_who_launched_this_process(monkeypatch):
    for var in ("LORAFIT_NPROC", "TORCHELASTIC_RUN_ID", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.launched_by() == "single process"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # an Accelerate setting alone is no launch
    assert distributed.launched_by() == "single process"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert distributed.launched_by() == "torchrun"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert distributed.launched_by() == "accelerate launch"
    monkeypatch.setenv("LORAFIT_NPROC", "2")
    assert distributed.launched_by() == "lorafit --nproc"


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert sweep.visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert sweep.visible_gpus() == []


def point(i: int, tmp_path: Path) -> sweep.Point:
    cfg = TrainConfig(model="random:tiny", batch_size=i + 1, out=str(tmp_path / f"p{i}"))
    return sweep.Point(f"id{i}", f"batch_size={i + 1}", {"batch_size": i + 1}, cfg)


def test_local_executor_gives_each_running_point_its_own_gpu(monkeypatch, tmp_path):
    active: set[str] = set()
    seen: list[str] = []
    lock = threading.Lock()

    def fake_run_point(p, log_dir, env=None):
        gpu = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            assert gpu not in active, "two points on one GPU"
            active.add(gpu)
            seen.append(gpu)
        time.sleep(0.05)
        with lock:
            active.remove(gpu)
        return RunRecord(p.label, "sweep", "ok", {}, id=p.id)

    monkeypatch.setattr(sweep, "run_point", fake_run_point)
    executor = sweep.LocalExecutor(parallel=1, gpus=["0", "1", "3"])
    assert executor.slots == 3 and "one per GPU (0, 1, 3)" in executor.describe()
    futures = [executor.submit(point(i, tmp_path), tmp_path) for i in range(9)]
    assert sorted(f.result().id for f in futures) == sorted(f"id{i}" for i in range(9))
    executor.close()
    assert set(seen) == {"0", "1", "3"} and len(seen) == 9

    one_gpu = sweep.LocalExecutor(parallel=2, gpus=["0"])  # one GPU: no pinning, --parallel decides
    assert one_gpu.slots == 2
    one_gpu.close()


def test_parallel_cpu_points_share_the_cores(monkeypatch, tmp_path):
    """`sweep --parallel N` on CPU: each point's process gets cores/N OpenMP threads. With a thread per core
    each, idle threads spin-wait on cores the other process needs: two SmolLM2 QLoRA trainings side by
    side took 373 s instead of 62 s, and every point's tokens/s was wrong by that much."""
    envs = []

    def fake_run_point(p, log_dir, env=None):
        envs.append(env or {})
        return RunRecord(p.label, "sweep", "ok", {}, id=p.id)

    monkeypatch.setattr(sweep, "run_point", fake_run_point)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for parallel, threads in ((2, "4"), (3, "2"), (16, "1")):
        executor = sweep.LocalExecutor(parallel=parallel, gpus=[])
        executor.submit(point(0, tmp_path), tmp_path).result()
        executor.close()
        assert envs.pop() == {"OMP_NUM_THREADS": threads}
    one = sweep.LocalExecutor(parallel=1, gpus=[])
    one.submit(point(0, tmp_path), tmp_path).result()
    one.close()
    assert envs.pop() == {}  # alone, a point keeps torch's own default
    pinned = sweep.LocalExecutor(parallel=1, gpus=["0", "1"])
    pinned.submit(point(0, tmp_path), tmp_path).result()
    pinned.close()
    assert envs.pop() == {"CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "4"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    two = sweep.LocalExecutor(parallel=2, gpus=[])
    two.submit(point(0, tmp_path), tmp_path).result()
    two.close()
    assert envs.pop() == {}  # the user's setting stands


def test_ray_executor_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(UserError, match=r"pip install 'lorafit\[ray\]'"):
        sweep.make_executor("ray")
    with pytest.raises(UserError, match="unknown executor"):
        sweep.make_executor("slurm")


@pytest.mark.parametrize("name", ["multi-node.yaml", "fsdp.yaml"])
def test_documented_accelerate_configs_are_valid(name):
    """docs/accelerate/*.yaml load as Accelerate configs, and every FSDP key is an option it knows."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    path = Path(__file__).parents[3] / "docs" / "accelerate" / name
    config = ClusterConfig.from_yaml_file(path)
    known = {a.dest for a in launch_command_parser()._actions}
    assert config.num_processes >= 2
    if name == "fsdp.yaml":
        assert config.distributed_type.value == "FSDP"
        assert set(config.fsdp_config) <= known, set(config.fsdp_config) - known
    else:
        assert config.distributed_type.value == "MULTI_GPU" and config.num_machines == 2
        assert config.main_process_ip and config.main_process_port


@pytest.mark.parametrize("group_by_length", [True, False])
def test_a_step_holds_the_same_samples_however_it_is_split(group_by_length):
    """The memory plan may turn batch 4 x accum 1 into 2 x 2 or 1 x 4: the data order must not move."""
    data = samples(64)

    def steps(batch: int, accum: int, world: int = 1) -> list[list[int]]:
        cfg = TrainConfig(model="random:tiny", batch_size=batch, grad_accum=accum, max_length=64,
                          group_by_length=group_by_length)  # fmt: skip
        plan = plan_steps(cfg, data, 3, world)
        assert all(len(mb) == batch for step in plan for mb in step)
        return [sorted(i for mb in step for row in mb for i in row) for step in plan]

    whole = steps(4, 1)
    assert len(whole) == 16 and sorted(i for s in whole for i in s) == list(range(64))
    assert steps(2, 2) == whole and steps(1, 4) == whole and steps(1, 2, world=2) == whole
