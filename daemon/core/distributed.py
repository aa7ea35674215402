"""A target split across ranks with MLX distributed, driven by rank 0.

``specd serve`` started by ``mlx.launch`` (or any launcher that sets MLX's rank variables)
finds a group of more than one rank. Every rank loads the target lazily and splits it
(`daemon.core.split`): tensor-parallel with mlx-lm's own ``shard(group)``, or by layers
(`daemon.core.pipeline`), reading only its share.

Only rank 0 decodes. It owns the draft, the engine and every decision of a round (the policy's
timings, the suffix index, grammar masks, cancellation all live there), so the ranks cannot
disagree about a round by construction. The other ranks follow: before each target forward,
rank 0 sends the tokens and the cache offset they extend through one collective
(`Channel`), and every rank runs the same forward over its shard, joined by the model's own
``all_sum`` calls. A follower needs no draft, buffer or adapter, and a layer-skip draft of a
sharded target is built on rank 0 alone, from full copies of the layers it uses, taken before
the target is sharded.

The prompt cache is kept by every rank (`MirroredPromptCache`): a lookup is agreed by all of
them, a finished request's cache is stored by all.

Every rank evaluates the same collectives: the forward evaluates the model body (all layers,
every collective) eagerly and returns the output head lazily, so what rank 0 later evaluates
of the logits costs no communication. A rank that dies shows up as an error in the next
collective; one that stops answering is caught by `Watchdog`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache, trim_prompt_cache

from daemon.core.backend import launch_rank
from daemon.core.prompt_cache import CACHE_KEY, PromptCache
from daemon.errors import DistributedError, ModelLoadError

# Message layout (int32): op, flags, cache offset, token count, then up to _INLINE tokens; a
# longer token list (a prefill chunk) follows in a second collective.
_HEADER = 4
_INLINE = 60
OP_HEARTBEAT, OP_FORWARD, OP_STOP, OP_PREFIX, OP_KEEP = 1, 2, 3, 4, 5
FLAG_FRESH, FLAG_NO_CACHE = 1, 2
PROTOCOL = 1


def _backend_from_environment() -> str:
    if os.environ.get("MLX_IBV_DEVICES") or os.environ.get("MLX_JACCL_COORDINATOR"):
        return "jaccl"
    if os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE"):
        return "mpi"
    if os.environ.get("MLX_HOSTFILE"):
        return "ring"
    return "any"


def _hosts_from_hostfile(size: int) -> list[str]:
    """Each rank's address from mlx.launch's ring hostfile (a JSON list per rank); "?" when
    the launcher did not leave one that can be read."""
    path = os.environ.get("MLX_HOSTFILE")
    hosts = ["?"] * size
    if not path:
        return hosts
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return hosts
    if isinstance(data, list):
        for i, entry in enumerate(data[:size]):
            if isinstance(entry, list) and entry and isinstance(entry[0], str):
                hosts[i] = entry[0]
            elif isinstance(entry, dict) and isinstance(entry.get("ips"), list) and entry["ips"]:
                hosts[i] = str(entry["ips"][0])
            elif isinstance(entry, str):
                hosts[i] = entry
    return hosts


def loopback_ports(n: int) -> list[int]:
    """``n`` loopback ports free right now (held together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def loopback_hostfile(path: Path, ranks: int) -> Path:
    """A ring hostfile for ``ranks`` processes on this machine (benchmarks, tests): what
    mlx.launch writes for ``--hosts 127.0.0.1 -n ranks``, on free ports."""
    path.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in loopback_ports(ranks)]))
    return path


@dataclass
class GroupInfo:
    """What ``/status`` and ``specd status`` show about the group."""

    size: int
    rank: int
    backend: str
    hosts: list[str]
    split: str = ""  # how the target is split, once sharded

    def describe_rank(self, rank: int) -> str:
        host = self.hosts[rank] if 0 <= rank < len(self.hosts) else "?"
        return f"rank {rank} ({host})"

    def others(self) -> str:
        """The ranks other than this one, named for an error message."""
        return ", ".join(self.describe_rank(r) for r in range(self.size) if r != self.rank)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "rank": self.rank,
            "backend": self.backend,
            "hosts": self.hosts,
            "split": self.split,
        }


@dataclass
class Group:
    """An initialised group of ranks: MLX's handle plus what is known about it."""

    handle: Any  # mx.distributed.Group
    info: GroupInfo

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def size(self) -> int:
        return self.info.size


def detect_group() -> Group | None:
    """The group this process was launched into, or None when it runs alone."""
    rank = launch_rank()
    if rank is None:
        return None
    try:
        # strict: a rank that cannot reach the others must fail, never serve on its own
        handle = mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise DistributedError(
            f"rank {rank} could not join its group ({_backend_from_environment()}, hostfile "
            f"{os.environ.get('MLX_HOSTFILE', '-')}): {e}; every rank must be started within "
            "about 30 s of the others"
        ) from e
    if handle.size() <= 1:
        return None
    size = handle.size()
    info = GroupInfo(size, handle.rank(), _backend_from_environment(), _hosts_from_hostfile(size))
    return Group(handle, info)


def barrier(group: Group) -> None:
    """Return on every rank once all have reached it."""
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group.handle, stream=mx.cpu))


# --- the body and head the forwards use ---------------------------------------------------


Body = Callable[..., mx.array]
Head = Callable[[mx.array], mx.array]


def body_and_head(model: nn.Module) -> tuple[Body, Head]:
    """mlx-lm's usual split of a causal LM: ``model.model`` (embeddings, layers, final norm)
    and the output head (``lm_head``, or the tied embedding). `handshake` confirms that the
    two make the model's own call."""
    inner = getattr(model, "model", None)
    if inner is None:
        raise DistributedError(
            f"{type(model).__module__} has no .model body; distributed serving needs one"
        )
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        return inner, lm_head
    embed = getattr(inner, "embed_tokens", None)
    if embed is None or not hasattr(embed, "as_linear"):
        raise DistributedError(f"{type(model).__module__}: no lm_head and no tied embedding")
    return inner, embed.as_linear


# --- the channel between rank 0 and the others ---------------------------------------------


@dataclass
class Message:
    op: int
    flags: int = 0
    offset: int = 0
    tokens: list[int] = field(default_factory=list)


class Channel:
    """Rank 0's messages to the other ranks, each one collective (two for long token lists):
    the others contribute zeros to an ``all_sum``, so everyone receives rank 0's array."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.messages = 0
        self.seconds = 0.0  # time spent in the channel's own collectives
        self.bytes = 0

    def _collective(self, data: mx.array) -> mx.array:
        t0 = time.perf_counter()
        out = mx.distributed.all_sum(data, group=self.group.handle, stream=mx.cpu)
        mx.eval(out)
        self.seconds += time.perf_counter() - t0
        self.bytes += data.nbytes
        return out

    def send(self, msg: Message) -> None:
        assert self.group.rank == 0, "only rank 0 sends"
        header = [msg.op, msg.flags, msg.offset, len(msg.tokens)]
        inline = msg.tokens[:_INLINE]
        data = header + inline + [0] * (_INLINE - len(inline))
        self._collective(mx.array(data, dtype=mx.int32))
        if len(msg.tokens) > _INLINE:
            self._collective(mx.array(msg.tokens[_INLINE:], dtype=mx.int32))
        self.messages += 1

    def receive(self) -> Message:
        got = cast(list[int], self._collective(mx.zeros(_HEADER + _INLINE, mx.int32)).tolist())
        op, flags, offset, count = got[:_HEADER]
        tokens = got[_HEADER : _HEADER + min(count, _INLINE)]
        if count > _INLINE:
            rest = self._collective(mx.zeros(count - _INLINE, mx.int32))
            tokens += cast(list[int], rest.tolist())
        self.messages += 1
        return Message(op, flags, offset, tokens)


class Watchdog:
    """Ends the process when a guarded collective runs past ``timeout`` seconds: a rank that
    stopped answering would otherwise hang every other rank forever. ``on_expire(what,
    seconds)`` logs the error; the process then exits with status 1 (os._exit: the stuck
    thread is inside MLX and cannot be interrupted) so the service manager restarts it."""

    def __init__(self, timeout: float, on_expire: Callable[[str, float], None]) -> None:
        self.timeout = timeout
        self.on_expire = on_expire
        self._since: float | None = None
        self._what = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="specd-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        with self._lock:
            self._since, self._what = time.monotonic(), what
        try:
            yield
        finally:
            with self._lock:
                self._since = None

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(0.25, self.timeout / 4)):
            with self._lock:
                since, what = self._since, self._what
            if since is not None and time.monotonic() - since > self.timeout:
                try:
                    self.on_expire(what, time.monotonic() - since)
                finally:
                    os._exit(1)


def _lost(error: BaseException) -> bool:
    """Whether an MLX error means the group broke (a peer's connection is gone)."""
    text = str(error).lower()
    return any(w in text for w in ("peer", "connection", "socket", "[ring]", "[jaccl]", "[mpi]"))


class GroupLost(DistributedError):
    """A collective failed because another rank is gone."""


# --- rank 0's view of the sharded target -----------------------------------------------------


class MirroredTarget(nn.Module):
    """The sharded target as rank 0's engine sees it: calling it tells the other ranks what
    to compute, then runs this rank's share. Looks like the model it wraps (``args``,
    ``layers``, ``make_cache``)."""

    def __init__(self, model: nn.Module, channel: Channel, watchdog: Watchdog) -> None:
        super().__init__()
        self.inner = model
        self._channel = channel
        self._watchdog = watchdog
        # plain attributes, not children: the body is already in the tree under ``inner``
        object.__setattr__(self, "_parts", body_and_head(model))
        # one message and its forward at a time, whichever thread calls (the worker, or a
        # handler probing the vocabulary)
        self._lock = threading.RLock()
        # the cache the others mirror now: a new one (a new request) starts theirs afresh
        self._cache_ref: Callable[[], Any] | None = None
        self.lost: GroupLost | None = None
        self.on_lost: Callable[[GroupLost], None] | None = None

    @property
    def args(self) -> Any:
        return self.inner.args

    @property
    def layers(self) -> Any:
        return cast(Any, self.inner).layers

    def make_cache(self) -> list[Any]:
        return make_prompt_cache(self.inner)

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None, **kw: Any) -> mx.array:
        if kw:
            raise DistributedError(f"distributed forward takes no {sorted(kw)}")
        tokens = cast(list[int], inputs.reshape(-1).tolist())
        if inputs.ndim != 2 or inputs.shape[0] != 1:
            raise DistributedError("distributed forward takes one sequence (batch of 1)")
        if cache is None:
            msg = Message(OP_FORWARD, FLAG_NO_CACHE, 0, tokens)
        else:
            offset = int(getattr(cache[0], "offset", 0))
            # by its first layer's cache: a list cannot be referenced weakly
            fresh = self._cache_ref is None or self._cache_ref() is not cache[0]
            if fresh and offset:
                raise DistributedError(
                    "the other ranks do not hold this KV cache: only a new one, or one the "
                    "prompt cache handed out with MirroredPromptCache, can be extended"
                )
            msg = Message(OP_FORWARD, FLAG_FRESH if fresh else 0, offset, tokens)
            self._cache_ref = weakref.ref(cache[0]) if fresh else self._cache_ref
        body, head = self._parts
        with self._lock, self.collectives("forward"):
            self._channel.send(msg)
            h = body(inputs, cache=cache)
            mx.eval(h)
        return head(h)

    def heartbeat(self) -> None:
        with self._lock, self.collectives("heartbeat"):
            self._channel.send(Message(OP_HEARTBEAT))

    def agree_prefix(self, tokens: list[int], covered: int, cache: list[Any]) -> int:
        """Rank 0 found ``covered`` tokens of ``tokens`` in its prompt cache (``cache``, a
        copy); every rank looks up the same tokens in its own and they settle on the least
        any of them holds. Returns that; ``cache`` is the one the next forward extends."""
        with self._lock, self.collectives("prompt cache lookup"):
            self._channel.send(Message(OP_PREFIX, 0, covered, tokens))
            agreed = _least_held(self._channel.group, covered)
        if agreed:
            self._cache_ref = weakref.ref(cache[0])
        return agreed

    def keep(self, tokens: list[int]) -> None:
        """Every other rank keeps its current cache as the one of ``tokens``."""
        with self._lock, self.collectives("prompt cache store"):
            self._channel.send(Message(OP_KEEP, 0, len(tokens), tokens))

    def stop_followers(self) -> None:
        if self.lost is None:
            with self._lock, self.collectives("stop"):
                self._channel.send(Message(OP_STOP))

    @contextmanager
    def collectives(self, what: str) -> Iterator[None]:
        if self.lost is not None:
            raise self.lost
        try:
            with self._watchdog.guard(what):
                yield
        except RuntimeError as e:
            if not _lost(e):
                raise
            lost = GroupLost(
                f"lost the group during {what}: {self._channel.group.info.others()} "
                f"stopped answering ({e})"
            )
            self.lost = lost
            if self.on_lost is not None:
                self.on_lost(lost)
            raise lost from e


class MirroredPromptCache(PromptCache):
    """Rank 0's prompt cache in a group. The target's entries exist on every rank (each
    holds its shard's KV for the same tokens), so a lookup is agreed by all ranks and a store
    is done by all. Each rank evicts by its own bounds: the least any rank holds is used, so
    an entry one rank dropped costs prefill, never a wrong cache. The draft's entries are
    rank 0's alone."""

    def __init__(self, max_entries: int, max_bytes: int, mirror: MirroredTarget) -> None:
        super().__init__(max_entries, max_bytes)
        self._mirror = mirror

    def fetch(self, which: str, tokens: list[int]) -> tuple[list[Any] | None, int]:
        cache, covered = super().fetch(which, tokens)
        if which != "target" or cache is None or not covered:
            return cache, covered
        agreed = self._mirror.agree_prefix(list(tokens), covered, cache)
        if agreed < covered:  # another rank holds less: everyone starts from there
            self.stats.cached_tokens -= covered - agreed
            if not agreed:
                self.stats.hits -= 1
                self.stats.misses += 1
                return None, 0
            trim_prompt_cache(cache, covered - agreed)
        return cache, agreed

    def store(self, which: str, tokens: list[int], cache: list[Any]) -> None:
        if which == "target" and self.enabled and tokens:
            self._mirror.keep(list(tokens))
        super().store(which, tokens, cache)


def _least_held(group: Group, mine: int) -> int:
    """The least of every rank's ``mine`` (one all_gather)."""
    seen = mx.distributed.all_gather(
        mx.array([mine], dtype=mx.int32), group=group.handle, stream=mx.cpu
    )
    return min(cast(list[int], seen.tolist()))


# --- the other ranks --------------------------------------------------------------------------


def follow(
    model: nn.Module,
    channel: Channel,
    watchdog: Watchdog,
    kept: LRUPromptCache | None = None,
) -> int:
    """Run the forwards rank 0 asks for until it says stop; returns the number of forwards.
    ``kept``: this rank's share of the prompt cache (`MirroredPromptCache`). Raises
    `GroupLost` when rank 0 is gone."""
    body, _ = body_and_head(model)
    cache: list[Any] | None = None
    forwards = 0
    info = channel.group.info
    started = False
    while True:
        try:
            # unguarded until rank 0's first message: it may still be loading its draft
            # (a download can take minutes); a rank 0 that dies meanwhile still fails this
            with watchdog.guard("waiting for rank 0") if started else nullcontext():
                msg = channel.receive()
            started = True
            if msg.op == OP_STOP:
                return forwards
            if msg.op == OP_HEARTBEAT:
                continue
            if msg.op == OP_PREFIX:
                cache = _lookup(kept, msg.tokens, msg.offset, channel.group)
                continue
            if msg.op == OP_KEEP:
                _store(kept, msg.tokens, cache)
                continue
            if msg.op != OP_FORWARD:
                raise DistributedError(f"unknown message {msg.op} from rank 0")
            use: list[Any] | None = None
            if not msg.flags & FLAG_NO_CACHE:
                if msg.flags & FLAG_FRESH or cache is None:
                    cache = make_prompt_cache(model)
                held = int(getattr(cache[0], "offset", 0))
                if held < msg.offset:
                    raise DistributedError(
                        f"rank {info.rank} holds {held} tokens of the cache, rank 0 extends "
                        f"{msg.offset}: the ranks are out of step"
                    )
                if held > msg.offset:
                    trim_prompt_cache(cache, held - msg.offset)
                use = cache
            with watchdog.guard("forward"):
                mx.eval(body(mx.array(msg.tokens, dtype=mx.uint32)[None], cache=use))
            forwards += 1
        except RuntimeError as e:
            if not _lost(e):
                raise
            raise GroupLost(
                f"rank {info.rank} lost {info.describe_rank(0)}: it stopped answering ({e})"
            ) from e


def _lookup(
    kept: LRUPromptCache | None, tokens: list[int], covered: int, group: Group
) -> list[Any] | None:
    """A follower's side of `MirroredTarget.agree_prefix`: the copy its next forward extends
    (None: a fresh cache)."""
    cache, rest = kept.fetch_nearest_cache(CACHE_KEY, tokens) if kept else (None, tokens)
    mine = min(covered, len(tokens) - len(rest)) if cache is not None else 0
    agreed = _least_held(group, mine)
    if cache is None or not agreed:
        return None
    if mine > agreed:
        trim_prompt_cache(cache, mine - agreed)
    return cache


def _store(kept: LRUPromptCache | None, tokens: list[int], cache: list[Any] | None) -> None:
    """A follower's side of `MirroredTarget.keep`: its current cache, trimmed to ``tokens``
    (a round's rejected tokens are trimmed lazily, at the next forward), goes into its own
    prompt cache."""
    if kept is None or cache is None or not tokens:
        return
    held = int(getattr(cache[0], "offset", 0))
    if held < len(tokens):
        return  # cannot happen in step; a shorter entry would only cost prefill anyway
    if held > len(tokens):
        trim_prompt_cache(cache, held - len(tokens))
    kept.insert_cache(CACHE_KEY, tokens, cache)
    kept.trim_to(n_sequences=kept.max_size, n_bytes=kept.max_bytes)


def handshake(group: Group, model: nn.Module, target_id: str) -> None:
    """Check that every rank loaded the same target and split it the same way, and that its
    body and head make the model's own call (the split `MirroredTarget` relies on). Runs on
    every rank, in lockstep, right after loading."""
    args = getattr(model, "args", None)
    described = json.dumps(
        {"p": PROTOCOL, "args": repr(sorted(vars(args).items())) if args else "", "id": target_id},
        sort_keys=True,
    )
    mine = zlib.crc32(described.encode()) & 0x7FFFFFFF
    seen = cast(
        list[int],
        mx.distributed.all_gather(
            mx.array([mine], dtype=mx.int32), group=group.handle, stream=mx.cpu
        ).tolist(),
    )
    differ = [r for r, v in enumerate(seen) if v != seen[0]]
    if differ:
        names = ", ".join(group.info.describe_rank(r) for r in differ)
        raise ModelLoadError(
            f"{names} loaded a different target or configuration than rank 0 "
            f"(models.target {target_id!r}); every rank needs the same model and config"
        )
    body, head = body_and_head(model)
    probe = mx.array([[1, 2, 3]], dtype=mx.uint32)
    if group.rank != 0:  # the same collectives as rank 0's two forwards; the head stays unread
        mx.eval(body(probe))
        mx.eval(body(probe))
        return
    whole = model(probe)
    mx.eval(whole)  # one forward at a time: a layer split's hand-offs pair up in order
    parts = head(body(probe))
    mx.eval(parts)
    gap = mx.abs(whole.astype(mx.float32) - parts.astype(mx.float32)).max()
    if cast(float, gap.item()) > 1e-3 * (1.0 + cast(float, mx.abs(whole).max().item())):
        raise DistributedError(
            f"{type(model).__module__}: its forward is not body + head; distributed serving "
            "does not support this model type"
        )
