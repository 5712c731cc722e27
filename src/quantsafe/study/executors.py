"""Where a study's cells run: in this process, one after another, or as Ray tasks over a cluster.

Both hand results back to the driver, which alone writes the store, so the two give the same rows. Ray does the
distributed part (scheduling by resources, retrying a task whose worker died); nothing here reimplements it.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Protocol

import torch

from quantsafe.errors import QuantsafeError
from quantsafe.models.device import resolve_device

Priority = tuple[int, ...]


@dataclass(frozen=True)
class Needs:
    """A cell's resource needs: Ray schedules by them; the local executor has nothing to schedule."""

    gpu: bool = False
    memory_bytes: int | None = None


class Executor(Protocol):
    """Runs cells; `next` returns the (handle, result) of some finished cell and raises the cell's own error."""

    name: str
    threads: int  # CPU threads each cell computes with

    def device(self, requested: str) -> str:
        """The device cells run on: "auto" resolved against where they run, not where the driver runs."""
        ...

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], priority: Priority, needs: Needs) -> int: ...

    def next(self) -> tuple[int, Any]: ...

    def pending(self) -> int: ...

    def close(self) -> None: ...


@dataclass
class LocalExecutor:
    """In-process, lowest priority first: each variant is prepared and answers everything before the next one is
    quantized (finished variants are usable while later ones run), then each judge reads every variant, so each
    model loads once."""

    name: str = "local"
    threads: int = field(default_factory=torch.get_num_threads)
    _queue: list[tuple[Priority, int, Callable[..., Any], tuple[Any, ...]]] = field(default_factory=list)
    _ids: count[int] = field(default_factory=count)

    def device(self, requested: str) -> str:
        return str(resolve_device(requested))

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], priority: Priority, needs: Needs) -> int:
        handle = next(self._ids)
        heapq.heappush(self._queue, (priority, handle, fn, args))
        return handle

    def next(self) -> tuple[int, Any]:
        _priority, handle, fn, args = heapq.heappop(self._queue)
        return handle, fn(*args)

    def pending(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        from quantsafe.study.cells import release_resident

        release_resident()


FORWARDED_ENV = ("QUANTSAFE_", "HF_", "TRANSFORMERS_", "OMP_WAIT_POLICY")


class RayExecutor:
    """Cells as Ray tasks (retried up to `max_retries` times when their worker dies). Starts a local cluster of
    `num_cpus` CPUs, or joins the one at `address` ("auto" or ray://host:port). On several machines, the study's
    artifacts_dir and the model cache must be on a path every node sees; the store stays with the driver."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, cpus_per_task: int = 1,
                 max_retries: int = 3):
        try:
            import ray
        except ImportError:
            raise QuantsafeError("--executor ray needs Ray: pip install 'quantsafe[ray]'") from None
        self._ray = ray
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        try:
            ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                     log_to_driver=False, runtime_env={"env_vars": env}, ignore_reinit_error=True)
        except ConnectionError as exc:
            raise QuantsafeError(f"cannot join the Ray cluster at {address}: {exc}") from None
        self.cpus_per_task, self.max_retries = cpus_per_task, max_retries
        self.threads = cpus_per_task
        self._remote: dict[Callable[..., Any], Any] = {}
        self._refs: dict[Any, int] = {}
        self._ids = count()

    def device(self, requested: str) -> str:
        if requested != "auto":
            return requested
        return "cuda" if self._ray.cluster_resources().get("GPU", 0) > 0 else "cpu"

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], priority: Priority, needs: Needs) -> int:
        if fn not in self._remote:
            self._remote[fn] = self._ray.remote(fn)
        options: dict[str, Any] = {"num_cpus": self.cpus_per_task, "num_gpus": 1 if needs.gpu else 0,
                                   "max_retries": self.max_retries}
        if needs.memory_bytes:
            options["memory"] = needs.memory_bytes
        handle = next(self._ids)
        self._refs[self._remote[fn].options(**options).remote(*args)] = handle
        return handle

    def next(self) -> tuple[int, Any]:
        from ray.exceptions import RayTaskError

        ready, _ = self._ray.wait(list(self._refs), num_returns=1)
        handle = self._refs.pop(ready[0])
        try:
            return handle, self._ray.get(ready[0])
        except RayTaskError as exc:
            raise exc.as_instanceof_cause() from None

    def pending(self) -> int:
        return len(self._refs)

    def close(self) -> None:
        for ref in self._refs:
            self._ray.cancel(ref, force=True)
        self._refs.clear()
        self._ray.shutdown()


def make_executor(name: str, address: str | None = None, num_cpus: int | None = None,
                  cpus_per_task: int = 1) -> Executor:
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address=address, num_cpus=num_cpus or (os.cpu_count() or 1), cpus_per_task=cpus_per_task)
    raise QuantsafeError(f"unknown executor '{name}'; choose local or ray")


def gpu_needed(device: str) -> bool:
    return torch.device(device).type == "cuda"
