"""A pool of Ray actors that survives dead actors: their jobs are retried and recorded.

Ray's own ``max_task_retries`` would retry silently; a reviewer of a result
wants to know that a shard was recomputed and where.  Here an actor that dies
(node lost, process killed, out of memory) is replaced by a fresh one, its job
is submitted again, and a ``retry`` event (job, attempt, error, node) is
written to the experiment's ``data/events``.  Jobs are deterministic and write
files with deterministic names, so a retry reproduces and overwrites its rows.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import pyarrow as pa

from cluster.records import node_name
from cluster.storage import Storage
from robust.results.schema import EVENT_SCHEMA, event_path, file_metadata, write_table


def record_event(storage: Storage, root: str, event: str, subject: str, detail: str, attempt: int = 0) -> None:
    """One row in ``data/events`` (a file of its own: concurrent writers never collide)."""
    row = {"event": event, "subject": subject, "attempt": attempt, "detail": detail[:2000],
           "node": node_name(), "time": time.time()}
    write_table(storage.filesystem, event_path(root, f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}"),
                pa.Table.from_pylist([row], schema=EVENT_SCHEMA), file_metadata({}))


def run_jobs(make_actor: Callable[[], Any], jobs: Sequence[Any], submit: Callable[[Any, Any], Any],
             actors: int, storage: Storage, root: str, describe: Callable[[Any], str] = str,
             max_attempts: int = 3) -> Iterator[Tuple[Any, Any]]:
    """Yield ``(job, result)`` as jobs finish on at most ``actors`` actors.

    ``submit(actor, job)`` returns an ObjectRef.  When the actor dies the job is
    retried on a new actor, up to ``max_attempts`` attempts in all; an error raised
    by the job itself (not a dead actor) propagates unchanged.
    """
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    lost = (RayActorError, ActorDiedError, ActorUnavailableError)
    queue: List[Tuple[Any, int]] = [(job, 1) for job in jobs]
    queue.reverse()
    idle = [make_actor() for _ in range(max(1, min(actors, len(jobs))))]
    running: Dict[Any, Tuple[Any, Any, int]] = {}
    while queue or running:
        while queue and idle:
            job, attempt = queue.pop()
            actor = idle.pop()
            running[submit(actor, job)] = (actor, job, attempt)
        done, _ = ray.wait(list(running), num_returns=1)
        ref = done[0]
        actor, job, attempt = running.pop(ref)
        try:
            result = ray.get(ref)
        except lost as err:
            ray.kill(actor, no_restart=True)
            reason = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            if attempt >= max_attempts:
                raise RuntimeError(f"job {describe(job)} failed on {attempt} actors; last error: {reason}") from None
            record_event(storage, root, "retry", describe(job), reason, attempt + 1)
            print(f"actor lost while running {describe(job)}; retrying (attempt {attempt + 1})", flush=True)
            queue.append((job, attempt + 1))
            idle.append(make_actor())
            continue
        idle.append(actor)
        yield job, result
