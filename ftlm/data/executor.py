"""Where the preparation's tasks run: worker processes on this machine (`data.executor: local`) or a Ray cluster
(`data.executor: ray`).

Both run the same task functions of `ftlm.data.pipeline` on small picklable task descriptions; every task reads its
inputs from and writes its outputs to `data.out_dir`, so on a cluster that folder must be on a file system that every
node mounts at the same path (NFS, Lustre, GPFS, ...), and every node must run the same environment (ftlm installed,
e.g. the same virtual environment on the shared file system).

Running on a Ray cluster
------------------------
Start Ray once per allocation, then point `data.ray_address` at the head (`null` starts a private Ray on this machine
with `data.num_workers` CPUs, which needs no setup at all)::

    # head node
    ray start --head --port=6379 --num-cpus=$(nproc)
    # every other node
    ray start --address=<head-host>:6379 --num-cpus=$(nproc)
    # then, on the head node
    ftlm-prepare data=custom data.executor=ray data.ray_address=<head-host>:6379

SLURM (one `ray start` per node; the job step on the first node runs the preparation)::

    #SBATCH --nodes=16 --ntasks-per-node=1 --cpus-per-task=64 --exclusive
    nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST")); head=${nodes[0]}
    srun -N1 -n1 -w "$head" ray start --head --port=6379 --num-cpus=$SLURM_CPUS_PER_TASK --block &
    sleep 20
    for n in "${nodes[@]:1}"; do
      srun -N1 -n1 -w "$n" ray start --address="$head:6379" --num-cpus=$SLURM_CPUS_PER_TASK --block &
    done
    sleep 20
    ftlm-prepare data=custom data.executor=ray data.ray_address="$head:6379"

A plain hostfile (one host name per line, the first is the head; ssh between the nodes works)::

    head=$(head -n1 hostfile)
    ssh "$head" ray start --head --port=6379
    tail -n +2 hostfile | xargs -I{} ssh {} ray start --address="$head:6379"
    ftlm-prepare data=custom data.executor=ray data.ray_address="$head:6379"
    # afterwards: xargs -a hostfile -I{} ssh {} ray stop

Failures: a task whose worker process dies (killed, out of memory, node lost) is run again, up to `MAX_RETRIES` times
(Ray's own task retries; for local workers the pool is restarted and the unfinished tasks resubmitted); the pipeline
counts the attempts of every task and reports the retried ones. An exception raised by a task is a bug or bad input
and stops the run at once with that exception.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
MAX_RETRIES = 3  # times a task is run again after its worker process died
RAY_HINT = "pip install 'ftlm[ray]'  (or: pip install 'ray>=2.9')"


class ExecutorError(RuntimeError):
    """The executor cannot run: Ray missing, its address unreachable, workers that keep dying."""


def _init_process(parent: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    _exit_with_parent(parent)


def _exit_with_parent(parent: int) -> None:
    """A worker ends when the preparation that started it dies (kill -9, the OOM killer, a scheduler's SIGKILL).

    Each worker holds both ends of the pool's call queue, so it never sees the parent go: orphans of ~750 MB each
    stayed alive for good, and every rerun after a crash added more. A daemon thread watches the parent's pid once
    a second (Linux's PR_SET_PDEATHSIG would follow the thread that started the worker, not the process).
    """
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class LocalExecutor:
    """`workers` processes on this machine ("spawn": safe beside torch and tokenizers' threads); in-process if <= 1."""

    name = "local"

    def __init__(self, workers: int):
        self.workers = max(int(workers), 1)
        self._pool: ProcessPoolExecutor | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        import multiprocessing

        return ProcessPoolExecutor(
            self.workers, multiprocessing.get_context("spawn"), initializer=_init_process, initargs=(os.getpid(),)
        )

    def map(self, fn: Callable, tasks: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        """Run fn(*task) for every task; yield (task index, result) as tasks finish (any order)."""
        if self.workers <= 1:
            for i, args in enumerate(tasks):
                yield i, fn(*args)
            return
        left = set(range(len(tasks)))
        restarts = 0
        while left:
            if self._pool is None:
                self._pool = self._new_pool()
            futures = {self._pool.submit(fn, *tasks[i]): i for i in sorted(left)}
            try:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        result = future.result()  # a task's own exception propagates from here
                        left.discard(futures[future])
                        yield futures[future], result
            except BrokenProcessPool:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
                restarts += 1
                if restarts > MAX_RETRIES:
                    raise ExecutorError(
                        f"local worker processes died {restarts} times (out of memory? killed?); "
                        f"{len(left)} task(s) unfinished — finished ones are kept, rerun to resume"
                    ) from None
                logger.warning("a worker process died; restarting the workers and rerunning %d task(s)", len(left))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, in one line, when nothing listens at a Ray address (ray.init would retry for minutes)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(f"data.ray_address={address!r} is not host:port (e.g. head-node:6379), 'auto' or null")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ExecutorError(
            f"data.ray_address={address}: no Ray head reachable there ({err.strerror or err}); start one with "
            f"`ray start --head --port={port}` on {host}, or set data.ray_address=null for a Ray on this machine"
        ) from None


class RayExecutor:
    """Ray tasks on the cluster at `address`, or on a private Ray started on this machine with `workers` CPUs."""

    name = "ray"

    def __init__(self, workers: int, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise ExecutorError(f"data.executor=ray needs Ray, which is not installed: {RAY_HINT}") from None
        self._ray = ray
        self.address = address
        if address:
            _check_reachable(address)
        env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
        kwargs: dict[str, Any] = dict(include_dashboard=False, runtime_env=env, logging_level=logging.WARNING)
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=max(int(workers), 1), **kwargs)
        except ConnectionError as err:
            raise ExecutorError(f"data.ray_address={address}: cannot join the Ray cluster: {err}") from None
        self.workers = max(int(ray.cluster_resources().get("CPU", workers)), 1)
        logger.info("Ray %s with %d CPU(s)", f"cluster at {address}" if address else "on this machine", self.workers)
        self._remote: dict[Callable, Any] = {}

    def map(self, fn: Callable, tasks: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        ray = self._ray
        remote = self._remote.get(fn)
        if remote is None:
            # max_retries: Ray reruns a task whose worker died; exceptions raised by the task are not retried.
            remote = self._remote[fn] = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(fn)
        refs = {remote.remote(*args): i for i, args in enumerate(tasks)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    for other in pending:
                        ray.cancel(other)
                    raise err.as_instanceof_cause() from None
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as err:
                    raise ExecutorError(
                        f"a Ray task kept losing its worker ({MAX_RETRIES} retries): {str(err).splitlines()[0]}; "
                        "finished tasks are kept, rerun to resume"
                    ) from None
                yield refs[ref], result

    def close(self) -> None:
        if self._ray.is_initialized():
            self._ray.shutdown()


def make_executor(executor: str | None, workers: int, ray_address: str | None = None):
    executor = executor or "local"
    if executor == "local":
        if ray_address:
            logger.warning("data.ray_address=%s is ignored with data.executor=local", ray_address)
        return LocalExecutor(workers)
    if executor == "ray":
        return RayExecutor(workers, ray_address)
    raise ExecutorError(f"data.executor must be one of {list(EXECUTORS)}, got {executor!r}")
