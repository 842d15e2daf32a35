"""Who runs in the next forward: the waiting and running queues, KV blocks, preemption.

Each step plans one forward over every request it can take (continuous batching):

1. Running requests, oldest first, each with its next chunk: one token when decoding, the
   rest of its prompt (as much as the step's token budget allows) when prefilling. When the
   KV pool cannot give a request the block its chunk needs, the most recently admitted
   running request is *preempted*: its blocks are freed and it goes back to the front of
   the waiting queue, to be recomputed from its prompt and the tokens it has generated.
2. Then, if nothing was preempted, waiting requests in order, while the step has room
   (``max_running`` sequences, ``max_batch_tokens`` new tokens) and the pool has blocks for
   the request's whole chunk; a request whose expert cannot run yet is passed over.

Why preempt by recompute rather than swap the blocks out: the blocks of a request are
recomputed by one prefill chunk, which costs about what copying them back would on a CPU,
and nothing has to be kept anywhere meanwhile; the request's sampler state and text stream
live outside the cache, so its stream carries on with nothing lost or repeated. Why the
most recent: the oldest requests are the furthest along and keep their progress.

Every block a step needs is counted here before the forward runs, so the forward never
finds the pool full half-way.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from meswitch.serve.engine.kv_cache import PagedKVCache
from meswitch.serve.engine.request import Request, RequestStatus


class Admission(enum.Enum):
    """Whether a waiting request may start now, from its expert's side."""

    READY = "ready"  # its expert can run now
    WAIT = "wait"  # its expert is loading: pass it over, admit those behind it
    BLOCKED = "blocked"  # its expert needs room others hold: admit no expert request behind it
    REJECT = "reject"  # it can never run (the gate set its error): end it


@dataclass
class StepPlan:
    """One step: the chunks of the forward and how the queues changed to make it."""

    chunks: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens), in order
    admitted: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # To end, still in their queue: refused by the admission gate; longer than the whole pool holds.
    rejected: list[Request] = field(default_factory=list)
    exhausted: list[Request] = field(default_factory=list)


class Scheduler:
    """The waiting and running queues over one paged KV cache.

    Parameters
    ----------
    cache
        The model's KV cache (its free blocks are counted; blocks are allocated by the forward).
    free_sequence
        Frees a sequence's blocks (the model's ``free``).
    gate
        The admission gate: whether a waiting request's expert lets it start now.
    max_running
        Sequences per forward at most.
    max_batch_tokens
        New tokens per forward at most; longer prefills are chunked.
    """

    def __init__(self, cache: PagedKVCache, free_sequence: Callable[[Hashable], None],
                 gate: Callable[[Request], Admission], *, max_running: int, max_batch_tokens: int) -> None:
        self.cache = cache
        self.free_sequence = free_sequence
        self.gate = gate
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.preempted_total = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take ``request`` out of its queue and free its blocks (it finished or was cancelled)."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.free_sequence(request.sequence)
        request.num_computed = 0

    def _tokens_that_fit(self, request: Request, free_blocks: int) -> int:
        """New tokens ``request`` can take with its blocks and ``free_blocks`` more."""
        length, size = self.cache.length(request.sequence), self.cache.block_size
        return (-(-length // size) + free_blocks) * size - length  # a sequence holds ceil(length / size) blocks

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        self.running.remove(request)
        self.free_sequence(request.sequence)
        request.num_computed = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.preempted_total += 1
        plan.preempted.append(request)

    def schedule(self) -> StepPlan:
        """Plan the next forward (possibly empty: nothing can run)."""
        plan = StepPlan()
        budget, reserved = self.max_batch_tokens, 0  # tokens left; blocks promised to chunks so far
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            size = min(request.num_tokens - request.num_computed, budget)
            fit = self._tokens_that_fit(request, self.cache.free_blocks - reserved)
            while fit < 1 and self.running[-1] is not request:  # make room: the newest goes back
                self._preempt(self.running[-1], plan)
                fit = self._tokens_that_fit(request, self.cache.free_blocks - reserved)
            if fit < 1:
                if index == 0:  # the oldest, alone: the pool cannot hold it any longer
                    plan.exhausted.append(request)
                else:
                    self._preempt(request, plan)
                break
            size = min(size, fit)  # a prefill may take a shorter chunk rather than preempt
            reserved += self.cache.blocks_needed(request.sequence, size)
            plan.chunks.append((request, size))
            budget -= size
            index += 1
        if not plan.preempted:
            self._admit(plan, budget, reserved)
        return plan

    def _admit(self, plan: StepPlan, budget: int, reserved: int) -> None:
        blocked = False  # an expert waits for room: admit only requests of the base after it
        index = 0
        while index < len(self.waiting) and len(self.running) < self.max_running and budget > 0:
            request = self.waiting[index]
            if blocked and request.expert is not None:
                index += 1
                continue
            admission = self.gate(request)
            if admission is Admission.REJECT:
                plan.rejected.append(request)  # the engine ends it (and takes it out of the queue)
                index += 1
                continue
            if admission is not Admission.READY:
                blocked = blocked or admission is Admission.BLOCKED
                index += 1
                continue
            if self.cache.blocks_needed(request.sequence, request.num_tokens) > self.cache.num_blocks:
                plan.exhausted.append(request)  # a preempted request that grew past the whole pool
                index += 1
                continue
            size = min(request.num_tokens, budget)
            needed = self.cache.blocks_needed(request.sequence, size)
            if needed > self.cache.free_blocks - reserved:
                break  # first come, first served: nobody overtakes a request waiting for blocks
            del self.waiting[index]
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            plan.admitted.append(request)
            plan.chunks.append((request, size))
            reserved += needed
            budget -= size
