"""Data-parallel `tench fit` on a Ray cluster: Ray Train's `TorchTrainer`, one process per worker.

Each worker builds its rank's part of the streams (`make_streams(config, rank, world_size)`:
disjoint, equal-length parts of every epoch), the same seeded model (`make_learner`), and
wraps the model with `ray.train.torch.prepare_model` (DDP: gloo on CPU, NCCL on GPU), so
every step averages the gradients of all workers. Without BatchNorm, N workers with batch
size `B` train like one process with batch size `N * B`; with BatchNorm each worker normalises
its own `B` samples, and the running statistics kept are rank 0's (DDP broadcasts them).

- Metrics: the loss/metric sums and counts of every epoch are all-reduced before they
  become a row of `learn.history`, so the figures rank 0 prints and logs are global.
- Only rank 0 prints progress and writes the run folder (metrics, plots, `last.pt`).
- Checkpoints go through Ray Train (`ray.train.report(..., checkpoint=...)`) into
  `storage` (a folder every node can reach, or `s3://...`). After a worker or node
  failure Ray Train restarts the group (`max_failures`) and every worker resumes from the
  last reported checkpoint: mid-epoch with `checkpoint_every`/`checkpoint_minutes`
  (`trainer.distributed_resume`), else the interrupted epoch is redone from its first
  batch; the log says which. `--resume` continues a run whose driver itself was lost, on
  the same or another number of workers.
- At the end the driver (on the head node) writes `last.pt`, `model.pt`,
  `metrics.json`/`.csv` and `config.json` into RUN_DIR from the last checkpoint, so the
  results are on the head node even when rank 0 ran elsewhere.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.actors import use_ray_thread_count
from pipeline.source import ShardSource
from pipeline.stream import ensure_ray
from shards.atomic import atomic_write_text
from shards.vocab import Vocab
from trainer.build import (
    close_streams,
    first_float_batch,
    make_learner,
    make_streams,
    schedule_callbacks,
)
from trainer.callbacks import (
    AvgStatsCallback,
    Callback,
    MetricsLogger,
    checkpoint_state,
    load_checkpoint,
    save_checkpoint,
)
from trainer.config import FitConfig, FitError
from trainer.distributed_resume import RankStepCheckpoint, resume_rank
from trainer.lsuv import lsuv_init
from trainer.models import create_model
from trainer.run_dir import (
    LAST_NAME,
    RAY_RUN_NAME,
    RAY_STORAGE_NAME,
    prepare_run_dir,
    run_summary,
    save_model,
    summary_line,
    write_config,
    write_metrics,
)
from trainer.transfer import load_init, read_init_source

log = logging.getLogger(__name__)

# Where Ray Train puts the training processes: "pack" fills one node before the next,
# "spread" puts them on as many nodes as it can (Ray's PACK and SPREAD strategies).
PLACEMENTS = ("pack", "spread")
Callbacks = Callable[[int, int], list]  # (rank, world_size) -> extra callbacks


@dataclass(frozen=True)
class ClusterOptions:
    """How `tench fit` spreads over a Ray cluster (the options `tench fit` lacks)."""

    num_workers: int = 2  # training processes (one per GPU on a GPU cluster)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # CPUs each training process holds (stream actors extra)
    storage: str | None = None  # Ray Train's storage_path; None: RUN_DIR/ray (one machine)
    max_failures: int = 3  # worker-group restarts after a failure before giving up
    placement: str = "pack"  # one of PLACEMENTS

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")
        if self.cpus_per_worker < 0:
            raise ValueError(f"cpus_per_worker must be >= 0, got {self.cpus_per_worker}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP (its state_dict has no `module.` prefix)."""
    return getattr(model, "module", model)


class ReduceStats(Callback):
    """All-reduce `AvgStatsCallback`'s sums and counts so every rank logs global figures.

    Runs just before the stats turn into a history row (`AvgStatsCallback` is order 40).
    """

    order = 35

    def after_epoch(self, learn) -> None:
        import torch.distributed as dist

        stats = learn.find_cb(AvgStatsCallback)
        if stats is None or not dist.is_initialized():
            return
        n_values = 1 + len(stats.metrics)
        device = next(unwrap(learn.model).parameters()).device
        for running in (stats.train, stats.valid):
            sums = running.sums if running.sums is not None else torch.zeros(n_values)
            packed = torch.cat([sums.float().to(device),
                                torch.tensor([float(running.count)], device=device)])
            dist.all_reduce(packed)  # SUM over workers
            running.sums, running.count = packed[:-1], int(packed[-1].item())
            if running.count == 0:
                running.sums = None


class RayTrainReport(Callback):
    """After each epoch: the global metrics to Ray Train, with a checkpoint from rank 0.

    Rank 0 also keeps `RUN_DIR/last.pt` (the plain model's weights, not DDP's).
    """

    order = 70

    def __init__(self, config: FitConfig, vocab: Vocab, run_dir: Path | None, is_main: bool):
        self.config, self.vocab, self.run_dir, self.is_main = config, vocab, run_dir, is_main

    def after_epoch(self, learn) -> None:
        import ray.train

        metrics = {k: v for k, v in learn.history[-1].items() if v is not None}
        if not self.is_main:
            ray.train.report(metrics)
            return
        state = checkpoint_state(learn, self.config.to_dict(), self.vocab)
        state["model"] = unwrap(learn.model).state_dict()
        if self.run_dir is not None:
            save_checkpoint(self.run_dir / LAST_NAME, state)
        with tempfile.TemporaryDirectory(prefix="tench-ckpt-") as folder:
            save_checkpoint(Path(folder) / LAST_NAME, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_worker(loop_config: dict) -> None:
    """One Ray Train worker: this rank's streams, the DDP model, the Learner, the fit."""
    import ray.train
    import ray.train.torch

    use_ray_thread_count()  # torch threads = this worker's CPUs, even in a preloaded worker
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    is_main = rank == 0
    device = ray.train.torch.get_device()
    config = FitConfig.from_dict(loop_config["fit"]).replace(device=str(device))
    run_dir = Path(loop_config["run_dir"]) if is_main else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    streams = make_streams(config, rank, world_size)
    try:
        vocab = streams.train.vocab
        learn = make_learner(config, streams, run_dir, is_main)
        learn.model.to(device, memory_format=torch.channels_last)  # before DDP sees it
        start_epoch = start_iter = 0
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                state = load_checkpoint(Path(folder) / LAST_NAME, vocab.fingerprint)
            start_epoch, start_iter = resume_rank(learn, state, rank)
            if is_main and start_iter:
                print(f"tench fit: resuming epoch {start_epoch} at training batch "
                      f"{start_iter} of {len(streams.train)} (the last checkpoint)", flush=True)
            elif is_main:
                print(f"tench fit: resuming from the checkpoint of epoch {state['epoch']}; "
                      f"epoch {start_epoch} is redone from its first batch (whatever it had "
                      f"trained before the failure is discarded)", flush=True)
        elif config.init:  # every rank loads it (DDP would broadcast rank 0's anyway)
            report = load_init(learn.model, read_init_source(config.init), vocab, config.arch)
            if is_main:
                print("\n".join(report.lines()), flush=True)
        elif config.lsuv:  # every rank computes it; DDP then broadcasts rank 0's weights
            lsuv_init(learn.model, first_float_batch(learn))
        learn.model = ray.train.torch.prepare_model(learn.model, move_to_device=False)
        cbs = [ReduceStats(), RayTrainReport(config, vocab, run_dir, is_main)]
        if config.checkpoint_every or config.checkpoint_minutes:
            cbs.append(RankStepCheckpoint(config.to_dict(), vocab, run_dir, is_main,
                                          config.checkpoint_every, config.checkpoint_minutes))
        if is_main:
            cbs.append(MetricsLogger(run_dir))
        extra = loop_config.get("callbacks")
        if extra is not None:
            cbs += list(extra(rank, world_size))
        learn.add_cbs(cbs)
        if start_epoch < config.epochs:
            learn.fit(config.epochs, cbs=schedule_callbacks(config), start_epoch=start_epoch,
                      start_iter=start_iter)
    finally:
        close_streams(streams)


def _ray_run(run_dir: Path, config: FitConfig, options: ClusterOptions) -> tuple[str, str]:
    """(storage_path, name) of this run's Ray Train folder: kept in RUN_DIR for --resume."""
    record = run_dir / RAY_RUN_NAME
    if config.resume:
        if not record.is_file():
            raise FitError(f"{record}: no distributed run to resume here; start it without "
                           "--resume")
        stored = json.loads(record.read_text())
        return stored["storage"], stored["name"]
    storage = options.storage or str(run_dir / RAY_STORAGE_NAME)
    if "://" not in storage:  # a folder: absolute, as Ray Train's workers run elsewhere
        storage = str(Path(storage).expanduser().resolve())
    name = f"{run_dir.resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}"  # fresh: no stale restore
    atomic_write_text(record, json.dumps({"storage": storage, "name": name}, indent=1))
    return storage, name


def for_workers(config: FitConfig) -> FitConfig:
    """`config` with every data set as an absolute path or URL: Ray Train runs each worker in
    a folder of its own, where a relative path would point."""
    return config.replace(shards=ShardSource.of(config.shards).url,
                          more_shards=tuple(ShardSource.of(s).url for s in config.more_shards))


def run_distributed(config: FitConfig, options: ClusterOptions,
                    callbacks: Callbacks | None = None) -> dict:
    """Train `config` with `options.num_workers` data-parallel workers; return a summary.

    Needs a running Ray (joined with `config.address`, or started here). `callbacks`
    (picklable) adds per-rank callbacks, e.g. to monitor what each rank sees.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if config.lr is None or config.lr_find:
        raise FitError("the LR finder runs on one machine: run `tench fit --lr-find` there "
                       "and pass the lr it suggests with --lr")
    start_time = time.perf_counter()
    run_dir = Path(config.out)
    if config.resume:
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = prepare_run_dir(config)
    storage, name = _ray_run(run_dir, config, options)
    ensure_ray(config.address)
    config = for_workers(config)
    meta = ShardSource.of(config.shards).read_meta()
    vocab = Vocab.from_json(meta)
    write_config(run_dir, config)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"fit": config.to_dict(), "run_dir": str(run_dir.resolve()),
                           "callbacks": callbacks},
        scaling_config=ScalingConfig(num_workers=options.num_workers, use_gpu=options.use_gpu,
                                     resources_per_worker={"CPU": options.cpus_per_worker},
                                     placement_strategy=options.placement.upper()),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=options.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()  # raises TrainingFailedError once max_failures are used up
    if result.checkpoint is None:
        raise FitError(f"the run in {storage}/{name} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = load_checkpoint(Path(folder) / LAST_NAME, vocab.fingerprint)
    save_checkpoint(run_dir / LAST_NAME, state)  # the head node's copy, wherever rank 0 ran
    write_metrics(run_dir, state["history"])
    model = create_model(config.arch, len(vocab))
    model.load_state_dict(state["model"])
    model_path = save_model(run_dir, model, config, vocab, meta["stats"])
    return run_summary(run_dir, model_path, config, state["history"], start_time,
                       num_workers=options.num_workers, checkpoint=result.checkpoint.path)


# ----------------------------------------------------------------------------- the CLI
def add_cluster_arguments(parser) -> None:
    """The options `tench fit` (and `trainer/submit.py`) add for data-parallel training."""
    group = parser.add_argument_group("data-parallel training on a Ray cluster")
    group.add_argument("--num-workers", type=int, default=None, metavar="N",
                       help="training processes in all (Ray Train workers); off by default")
    group.add_argument("--workers-per-node", type=int, default=None, metavar="K",
                       help="training processes per node (per GPU node with --gpu); "
                            "the total follows the nodes alive at the start")
    group.add_argument("--gpu", action="store_true", help="one GPU per training process")
    group.add_argument("--cpus-per-worker", type=float, default=1.0,
                       help="CPUs each training process holds (default 1)")
    group.add_argument("--storage", default=None, metavar="PATH_OR_URL",
                       help="Ray Train checkpoint storage every node reaches: a shared folder "
                            "or s3://bucket/path (default RUN_DIR/ray, one machine only)")
    group.add_argument("--max-failures", type=int, default=3,
                       help="restarts after a worker or node failure (default 3)")
    group.add_argument("--placement", choices=PLACEMENTS, default="pack",
                       help="pack: fill one node before the next; spread: as many nodes as "
                            "possible (default pack)")


def count_nodes(use_gpu: bool) -> int:
    """Alive nodes that can host a training process (with a GPU when `use_gpu`)."""
    import ray

    kind = "GPU" if use_gpu else "CPU"
    return sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get(kind, 0) > 0)


def cluster_options_from_args(args) -> ClusterOptions:
    num_workers = args.num_workers
    if num_workers is None:
        nodes = count_nodes(args.gpu)
        if nodes == 0:
            raise FitError("no node of the cluster has a " + ("GPU" if args.gpu else "CPU"))
        num_workers = args.workers_per_node * nodes
    return ClusterOptions(num_workers=num_workers, use_gpu=args.gpu,
                          cpus_per_worker=args.cpus_per_worker, storage=args.storage,
                          max_failures=args.max_failures, placement=args.placement)


def main_distributed(config: FitConfig, args) -> int:
    """`tench fit ... --num-workers N` / `--workers-per-node K`: train on the cluster."""
    ensure_ray(config.address)  # join first: --workers-per-node counts the nodes
    options = cluster_options_from_args(args)
    print(f"tench fit: {options.num_workers} data-parallel workers "
          f"({'GPU' if options.use_gpu else 'CPU'}), global batch "
          f"{options.num_workers * config.batch_size}", flush=True)
    summary = run_distributed(config, options)
    print(summary_line(summary, f" on {options.num_workers} workers"), flush=True)
    return 0
