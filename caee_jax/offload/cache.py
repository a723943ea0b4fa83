"""The device expert cache: S fixed slots per MoE layer, filled from an expert store on demand.

Device state (`ExpertCache`, a pytree threaded through every step and donated): the slots' weights
[L, S, ...] and `slot_of` [L, E] (the slot holding each expert, -1 when not resident). Shapes never
change, so residency is data and nothing recompiles as experts come and go.

Host state (`CacheManager`): which expert sits in which slot, the eviction policy and per-step counters of
fetches. The compiled step talks to it through ordered host callbacks (`execute.py`): once per layer to
announce which experts the layer will run (the misses are read together and returned with the slots they
take, as many as fit in slots the layer does not need), and once per miss that did not fit, when the loop
reaches that expert. A host callback costs far more than a copy here (~0.3-1.5 ms each on this 2-core
machine, docs/RESULTS.md), hence one call per layer, not per miss, and none at all for a layer with nothing
to read: no kept miss and (with read-ahead) no predicted expert to prefetch or staged read to drop. So what
every layer must record, whether it calls back or not, lives on the device (`Usage`: the policies' use
history and the hit/miss counters), updated in the compiled step and handed to the host with each callback
(history) or when the caller takes a step's statistics (counters).
The host decides; the device applies, so the two always agree.

Policies (which resident expert leaves when a slot is needed), never an expert the current layer has yet
to run while another choice exists (then the one it runs last):
  lru    least recently used
  lfu    least often used (ties: least recently)
  cost   lowest expected refetch cost: an exponentially decayed use count (recent use weighs more)
         times the fetch time of the store's tier from the cost table; with one store this ranks like
         a decayed LFU, and it is the policy that lets a tier's price enter eviction.
Letters: L MoE layers, E experts, S slots, D hidden, F expert width.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from caee_jax.caee.cost_table import CostTable
from caee_jax.choice import Choice
from caee_jax.offload.store import ExpertStore

DECAY = 0.9  # per layer-step of its layer, the weight an older use keeps in the `cost` policy's count


class Policy(Choice):
    LRU = "lru"
    LFU = "lfu"
    COST = "cost"


COUNTED = ("hits", "misses", "pruned_misses", "predicted_needed", "predicted_hits")  # `Usage.counts`, in order


class Usage(NamedTuple):
    """What every offloaded layer records on the device, callback or not. Per MoE layer and expert [L, E]:
    last_use int32 (the `clock` of the layer-step that last ran it), uses int32 (how many layer-steps ran
    it), decayed float32 (use count decayed by DECAY per layer-step of its layer), predicted bool (the
    previous layer's pre-gating prediction of this layer's experts, all False when none); clock int32 []
    (layer-steps so far); counts int32 [len(COUNTED)]: running totals of `COUNTED`, modulo 2**32 (the host
    takes differences, `CacheManager.take_step_stats`)."""

    last_use: jnp.ndarray
    uses: jnp.ndarray
    decayed: jnp.ndarray
    predicted: jnp.ndarray
    clock: jnp.ndarray
    counts: jnp.ndarray


class ExpertCache(NamedTuple):
    """gate, up [L, S, D, F]; down [L, S, F, D]: the store dtype's bits as unsigned integers of its width
    (XLA:CPU would update a bfloat16 cache in float32, converting all of it on every fetch; integers are
    only moved); slot_of [L, E] int32 (-1: not resident); usage: the layers' use history and counters."""

    gate: jnp.ndarray
    up: jnp.ndarray
    down: jnp.ndarray
    slot_of: jnp.ndarray
    usage: Usage


def cache_bits(dtype) -> np.dtype:
    """The unsigned integer dtype an `ExpertCache` holds `dtype`'s weights as."""
    return np.dtype(f"uint{8 * np.dtype(dtype).itemsize}")


@dataclasses.dataclass
class StepStats:
    """One decode step (or prefill), summed over MoE layers: routed experts that were resident (hits) or not
    (misses); misses the rule pruned (never loaded); fetches, split into blocking (read while the step
    waited) and prefetched (already read in the background); bytes read from the store; fetch_wait_s: seconds
    the step spent inside fetches (reading, or waiting for a background read to finish); experts needed by
    layers whose experts the previous layer predicted (pre-gating), and how many of them were predicted."""

    hits: int = 0
    misses: int = 0
    pruned_misses: int = 0
    fetches: int = 0
    blocking_fetches: int = 0
    prefetched_fetches: int = 0
    bytes_read: int = 0
    fetch_wait_s: float = 0.0
    predicted_needed: int = 0
    predicted_hits: int = 0

    @classmethod
    def total(cls, steps) -> StepStats:
        """The counters summed over several steps."""
        total = cls()
        for step in steps:
            for field, value in vars(step).items():
                setattr(total, field, getattr(total, field) + value)
        return total

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    @property
    def prediction_recall(self) -> float:
        """Share of the experts a layer needed that the previous layer's pre-gating predicted."""
        return self.predicted_hits / max(self.predicted_needed, 1)

    def as_dict(self) -> dict:
        """The counters, plus hit_rate and prediction_recall (for JSON reports)."""
        return dataclasses.asdict(self) | dict(hit_rate=self.hit_rate, prediction_recall=self.prediction_recall)


def slots_for(store: ExpertStore, *, experts: int | None = None, fraction: float | None = None, nbytes=None) -> int:
    """Slots per layer from exactly one budget: a count of experts, a fraction of the layer's experts, or a
    byte budget for the whole cache (every layer). At least 1 (a layer runs one expert at a time)."""
    given = [b is not None for b in (experts, fraction, nbytes)]
    if sum(given) != 1:
        raise ValueError("give exactly one cache budget: experts, fraction or bytes")
    num_layers, num_experts = store.config.num_moe_layers, store.config.n_routed_experts
    if experts is not None:
        slots = int(experts)
    elif fraction is not None:
        slots = math.floor(fraction * num_experts)
    else:
        slots = int(nbytes) // (num_layers * store.expert_bytes)
    if slots < 1:
        minimum = f"{num_layers * store.expert_bytes} bytes (one expert per MoE layer)"
        raise ValueError(f"a cache budget of {slots} slot(s) per layer holds nothing; the minimum is {minimum}")
    return min(slots, num_experts)


class CacheManager:
    """Host side of the expert cache of one model. Compared and hashed by identity: it is part of the static
    plan (`Execution.offload`), and the compiled step calls back into this very object."""

    def __init__(
        self,
        store: ExpertStore,
        slots: int,
        policy: Policy | str = Policy.LRU,
        table: CostTable | None = None,
        prefetch: bool = True,
    ):
        self.store = store
        self.slots = slots
        self.policy = Policy.parse(policy, "eviction policy")
        config = store.config
        self.num_layers, self.num_experts = config.num_moe_layers, config.n_routed_experts
        fetch_s = table.devices[0].fetch_s[store.tier_index] if table is not None else 1.0
        self.fetch_s = fetch_s
        self.slot_expert = np.full((self.num_layers, slots), -1, np.int64)  # expert in each slot
        self.slot_of = np.full((self.num_layers, self.num_experts), -1, np.int64)
        # The device's `Usage` history of a layer, as of its last `announce` (what `_victim` ranks by).
        self.last_use = np.zeros((self.num_layers, self.num_experts), np.int64)
        self.uses = np.zeros((self.num_layers, self.num_experts), np.int64)
        self.decayed = np.zeros((self.num_layers, self.num_experts))
        self.needed = np.zeros((self.num_layers, self.num_experts), bool)
        self.hit_at_announce = np.zeros((self.num_layers, self.num_experts), bool)
        self.prefetch = prefetch
        self.step = StepStats()
        self.counted = np.zeros(len(COUNTED), np.uint32)  # `Usage.counts` at the last `take_step_stats`
        self._stacks: dict[int, list[np.ndarray]] = {}  # `announce`'s result weights, per bound, reused

    __hash__ = object.__hash__

    def __eq__(self, other) -> bool:
        return self is other

    @property
    def reads_ahead(self) -> bool:
        """Whether `announce` starts background reads of predicted experts (pre-gating on a store with a read
        pool): then a layer with a predicted expert to read, or a staged read to drop, calls back."""
        return self.prefetch and getattr(self.store, "prefetch", None) is not None

    def empty_cache(self) -> ExpertCache:
        """The device state of an empty cache, with no use history (and resets the host side to match)."""
        c, dtype = self.store.config, cache_bits(self.store.dtype)
        self.slot_expert[:] = -1
        self.slot_of[:] = -1
        for history in (self.last_use, self.uses, self.decayed):
            history[:] = 0
        self.counted[:] = 0
        d, f, shape = c.hidden_size, c.moe_intermediate_size, (self.num_layers, self.slots)
        zeros = [jnp.zeros((*shape, *s), dtype) for s in ((d, f), (d, f), (f, d))]
        per_expert = (self.num_layers, self.num_experts)
        usage = Usage(
            last_use=jnp.zeros(per_expert, jnp.int32),
            uses=jnp.zeros(per_expert, jnp.int32),
            decayed=jnp.zeros(per_expert, jnp.float32),
            predicted=jnp.zeros(per_expert, bool),
            clock=jnp.zeros((), jnp.int32),
            counts=jnp.zeros(len(COUNTED), jnp.int32),
        )
        return ExpertCache(*zeros, jnp.full(per_expert, -1, jnp.int32), usage)

    def twin(self) -> CacheManager:
        """A manager of the same slots, policy, prefetch and miss price over its own reader of the same store
        (`ExpertStore.reopen`): its residency, statistics and background reads are its own, so one side of a
        comparison never warms, or reads for, the other's cache. Start it with its own `empty_cache()`."""
        twin = CacheManager(self.store.reopen(), self.slots, self.policy, None, self.prefetch)
        twin.fetch_s = self.fetch_s
        return twin

    def hold(self, cache: ExpertCache, layer: int, experts: Sequence[int]) -> ExpertCache:
        """`cache` (donated by the caller) with exactly `experts` (distinct, at most `slots`) resident in MoE
        layer `layer`, in slots 0.., read from the store; the host side matches and the layer's use history is
        cleared. Not counted in the step statistics: a chosen starting residency (calibration, tests)."""
        experts = [int(e) for e in experts]
        if len(set(experts)) != len(experts) or len(experts) > self.slots:
            raise ValueError(f"hold: {experts} are not at most {self.slots} distinct experts")
        weights = self.store.read_many(layer, experts)
        self.slot_expert[layer] = -1
        self.slot_of[layer] = -1
        self.slot_expert[layer, : len(experts)] = experts
        self.slot_of[layer, experts] = np.arange(len(experts))
        for history in (self.last_use, self.uses, self.decayed):
            history[layer] = 0
        written = [
            w.at[layer, : len(experts)].set(np.stack([e[i] for e in weights]).view(w.dtype)) if experts else w
            for i, w in enumerate(cache[:3])
        ]
        usage = cache.usage
        cleared = [
            h.at[layer].set(jnp.zeros_like(h[layer]))
            for h in (usage.last_use, usage.uses, usage.decayed, usage.predicted)
        ]
        usage = usage._replace(**dict(zip(("last_use", "uses", "decayed", "predicted"), cleared, strict=True)))
        return ExpertCache(*written, jnp.asarray(self.slot_of, jnp.int32), usage)

    def take_step_stats(self, cache: ExpertCache) -> StepStats:
        """The statistics since the last call (or `empty_cache`): the host's fetch counters, then zeroed, plus
        the differences of the device counters of `cache` (the cache the last step returned; read before it
        is donated to the next step)."""
        counts = np.asarray(cache.usage.counts).view(np.uint32)
        step, self.step = self.step, StepStats()
        for field, new in zip(COUNTED, counts - self.counted, strict=True):  # modulo 2**32
            setattr(step, field, getattr(step, field) + int(new))
        self.counted = counts.copy()
        return step

    # Host callbacks, called by the compiled step in program order (`execute.py`).

    def announce(self, layer, kept: np.ndarray, next_hint: np.ndarray, last_use, uses, decayed, *, bound: int):
        """Layer `layer` will run the experts `kept` [E] bool, and has a miss or (`reads_ahead`) a read to
        start or drop; last_use, uses, decayed [E]: its `Usage` history, this layer-step included (the device
        counted hits, misses and the prediction). Drops staged reads this layer does not need, starts reading
        the misses (before any prediction, so they come first on the read pool), and (with `prefetch`) starts
        reading the next layer's predicted experts `next_hint` [E] bool that are not resident. Then loads the
        misses, in increasing id, into slots the layer does not need, up to `bound` of them (what does not fit
        is fetched by the loop, `fetch`), in one call instead of one per miss. Returns padded to `bound`:
        (slots int32 (S: none), experts int32 (E: none), evicted experts int32 (E: none), gate, up
        [bound, D, F], down [bound, F, D])."""
        layer = int(layer)
        kept, next_hint = np.asarray(kept, bool), np.asarray(next_hint, bool)
        self.last_use[layer], self.uses[layer], self.decayed[layer] = last_use, uses, decayed
        resident = self.slot_of[layer] >= 0
        self.needed[layer] = kept
        self.hit_at_announce[layer] = kept & resident
        misses = np.flatnonzero(kept & ~resident).tolist()
        prefetch = getattr(self.store, "prefetch", None)
        if prefetch is not None:
            self.store.retain(layer, misses)  # mispredicted reads make room for this layer's misses
            prefetch(layer, misses)
        if layer + 1 < self.num_layers and self.reads_ahead:
            prefetch(layer + 1, np.flatnonzero(next_hint & (self.slot_of[layer + 1] < 0)).tolist())
        return self._load(layer, misses, bound)

    def _load(self, layer: int, misses: list[int], bound: int):
        """`announce`'s loads: the first misses that find a slot the layer does not need, read together."""
        placed = []  # (expert, slot, evicted)
        for expert in misses[:bound]:
            slot = self._victim(layer, expert, upfront=True)
            if slot is None:
                break
            placed.append((expert, slot, int(self.slot_expert[layer, slot])))
            self._assign(layer, expert, slot)
        experts = [expert for expert, _, _ in placed]
        start = time.perf_counter()
        self._count_fetches(layer, experts)
        weights = self.store.read_many(layer, experts)
        self.step.fetch_wait_s += time.perf_counter() - start
        c = self.store.config
        d, f = c.hidden_size, c.moe_intermediate_size
        out = [np.full(bound, fill, np.int32) for fill in (self.slots, self.num_experts, self.num_experts)]
        if bound not in self._stacks:
            self._stacks[bound] = [np.zeros((bound, *shape), self.store.dtype) for shape in ((d, f), (d, f), (f, d))]
        # Reused from call to call: the callback copies its results into the program's buffers before it
        # returns, and the program writes only the rows of placed misses into the cache, so rows past them may
        # hold an earlier call's experts. Fresh stacks cost a page fault per 4 KiB written, every layer and
        # step (V2-Lite: 104 MB per layer).
        stacks = self._stacks[bound]
        for i, ((expert, slot, evicted), read) in enumerate(zip(placed, weights, strict=True)):
            out[0][i], out[1][i], out[2][i] = slot, expert, evicted if evicted >= 0 else self.num_experts
            for stack, w in zip(stacks, read, strict=True):
                stack[i] = w
        return (*out, *stacks)

    def _assign(self, layer: int, expert: int, slot: int) -> None:
        evicted = int(self.slot_expert[layer, slot])
        if evicted >= 0:
            self.slot_of[layer, evicted] = -1
        self.slot_expert[layer, slot] = expert
        self.slot_of[layer, expert] = slot

    def _count_fetches(self, layer: int, experts: Sequence[int]) -> None:
        ready = getattr(self.store, "ready", None)
        prefetched = sum(bool(ready is not None and ready(layer, e)) for e in experts)
        self.step.fetches += len(experts)
        self.step.prefetched_fetches += prefetched
        self.step.blocking_fetches += len(experts) - prefetched
        self.step.bytes_read += len(experts) * self.store.expert_bytes

    def fetch(self, layer, expert):
        """Expert `expert` of layer `layer`, not resident (a miss `announce` found no slot for): reads it and
        gives it a slot. Returns (slot int32, evicted expert int32 or E when the slot was empty, gate, up
        [D, F], down [F, D])."""
        layer, expert = int(layer), int(expert)
        start = time.perf_counter()
        self._count_fetches(layer, [expert])
        weights = self.store.read(layer, expert)
        self.step.fetch_wait_s += time.perf_counter() - start
        if self.hit_at_announce[layer, expert]:  # evicted since by this layer's own fetches: a miss after all
            self.hit_at_announce[layer, expert] = False
            self.step.hits -= 1
            self.step.misses += 1
        slot = self._victim(layer, expert)
        evicted = int(self.slot_expert[layer, slot])
        self._assign(layer, expert, slot)
        evicted = evicted if evicted >= 0 else self.num_experts
        return (np.int32(slot), np.int32(evicted), *(np.asarray(w, self.store.dtype) for w in weights))

    def _victim(self, layer: int, expert: int, upfront: bool = False) -> int | None:
        """The slot for `expert`: an empty one, else the policy's choice among experts this layer does not
        need or (in the loop, not `upfront`) has already run (the loop visits experts in increasing id); when
        every slot holds an expert the layer still has to run: None upfront, else the one it runs last (it
        is refetched then)."""
        experts = self.slot_expert[layer]
        empty = np.flatnonzero(experts < 0)
        if empty.size:
            return int(empty[0])
        candidates = np.flatnonzero(~self.needed[layer, experts] | ((not upfront) & (experts < expert)))
        if candidates.size == 0:
            return None if upfront else int(np.argmax(experts))
        owners = experts[candidates]
        if self.policy is Policy.LRU:
            keys = (self.last_use[layer, owners],)
        elif self.policy is Policy.LFU:
            keys = (self.last_use[layer, owners], self.uses[layer, owners])
        else:
            keys = (self.last_use[layer, owners], self.decayed[layer, owners] * self.fetch_s)
        return int(candidates[np.lexsort(keys)[0]])


@dataclasses.dataclass(frozen=True)
class Offload:
    """How a model runs with offloaded experts: where they live, and how many the device keeps.

    store: "host" (host RAM) or "disk" (`directory`, an expert store written by
      `python -m checkpoints_tools.expert_store`). Cache budget, one of: `experts` slots per MoE layer,
      `fraction` of each layer's experts (default 0.25 when none is given), or `nbytes` for the whole
      cache. policy: eviction (module doc). prefetch: read the next layer's predicted experts (pre-gating)
      in the background while this layer computes (a disk store's thread pool; host reads are copies).
    dtype: a disk store's expert dtype when narrower than the model's (e.g. bfloat16 experts under a
      float32 model: each active expert is converted inside the expert loop); None: the model's dtype.
    """

    store: str = "host"
    directory: str | None = None
    experts: int | None = None
    fraction: float | None = None
    nbytes: int | None = None
    policy: Policy = Policy.LRU
    prefetch: bool = True
    dtype: str | None = None

    def __post_init__(self):
        if self.store not in ("host", "disk"):
            raise ValueError(f"offload store {self.store!r} is not 'host' or 'disk'")
        if (self.store == "disk") != (self.directory is not None):
            raise ValueError("a disk store needs its directory, and only a disk store takes one")
        if self.dtype is not None and self.store != "disk":
            raise ValueError("only a disk store takes its own dtype (a host store holds the model's weights)")
        object.__setattr__(self, "policy", Policy.parse(self.policy, "eviction policy"))

    def manager(self, store: ExpertStore, table: CostTable | None = None) -> CacheManager:
        """The host side of a cache of this budget over `store`."""
        budget = dict(experts=self.experts, fraction=self.fraction, nbytes=self.nbytes)
        if all(value is None for value in budget.values()):
            budget["fraction"] = 0.25
        return CacheManager(store, slots_for(store, **budget), self.policy, table, self.prefetch)
