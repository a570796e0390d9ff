"""The served weights and how a new version replaces them, so that no reply ever comes from a torn or mixed model.

A request borrows one model copy (a *slot*) for its whole generation and learns which version that slot holds.
An update first checks everything it can without reading tensor bytes (every rank's manifest, sizes, headers,
names, shapes, dtypes; with ``verify="full"`` also every checksum, at a second read), then writes, hashing each
part as it goes (the default ``"stream"``: every byte read once):

- ``in_place`` (one copy, memory-bounded): new requests wait, running ones finish, the update writes, requests
  resume on the new version.
- ``double_buffer`` (two copies): the update writes the spare copy while requests keep using the live one, then
  the two switch between requests; the old copy stays as the spare, holding the previous version.

If writing fails midway (a corrupt part, storage dies, a part changed after it was checked), the previous version
is put back: reloaded from storage in ``in_place`` (the slot is unusable until then), untouched in ``double_buffer``.
A server started from a model directory (``adopt``) serves its weights as level 0 and reloads them the same way.
A delta version (``storage.delta``) is applied onto the copy being written when that copy's digest is the delta's
base (``double_buffer`` first copies the live weights into the spare when those are the base), else loaded through
its chain; either way the result's digest must be the version's, or the update is undone as above. Each copy keeps,
per rank, the digest it provably holds and each tensor's ``sum64`` (taken at a full load, in the pass that gives
its digest), so a delta onto it is proven from its changed elements alone (``storage/FORMAT.md``): no pass over the
model, unless ``verify="full"``.
If even the reload fails, the server reports itself unhealthy instead of serving a torn model.

A fleet flips as one in two phases (``flows.sync``): ``prepare`` makes a version ready without serving it and
``commit`` serves it. In ``double_buffer`` the spare copy is loaded and proven by digest, so the commit is a pointer
flip and a rollback after it a flip back. ``in_place`` has one copy, so it cannot hold a version without serving
it: its prepare checks what it can without writing (manifests, sizes, headers, fit) and its commit is the update.
Prepared state expires (``prepare``'s ``ttl``) and a second prepare replaces the first. An ``in_place`` server that
took a delta goes back to its base by applying the same delta again (XOR undoes itself), proven by the base's
digest, instead of reloading the base from storage.

A request may name the version that must answer it (``acquire(version)``): the live copy when it holds it, the
spare of ``double_buffer`` when that does (just prepared, or the version just replaced), else it is refused.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import kernels
import storage
from infer.config import ModelConfig
from infer.digest import state_digest
from infer.engine import Busy, VersionUnavailable
from infer.metrics import Metrics
from infer.model import Decoder, load_state
from infer.updates import (  # noqa: F401 - infer.weights re-exports them
    NotPrepared,
    NotReady,
    Prepared,
    RestoreFailed,
    SnapshotRejected,
    StorageUnavailable,
    Undo,
    UpdateBusy,
    UpdateError,
    WeightInfo,
    cause,
)
from storage import apply_plan, check_source, deltaload, layout, load_plan, shard_views
from storage.digest import state_digest as snapshot_digest
from storage.tp import private_replicas

log = logging.getLogger("baton.serve")
MODES = ("in_place", "double_buffer")
PREPARE_TTL = 300.0  # seconds a prepared version waits for its commit: a flow that died must not pin a spare


@dataclass(eq=False)
class Slot:
    model: Decoder
    info: WeightInfo | None = None
    readers: int = 0
    writing: bool = False  # an update is writing it: no request may start on it
    # per rank, what the copy provably holds while ``info`` is set: the rank state's digest (the one deltas name their
    # base by) and each tensor's sum64, which a delta's apply advances from the changed elements alone
    held: dict[int, tuple[str, dict[str, int]]] | None = None

    def record(self, rank: int) -> tuple[str, dict[str, int]] | None:
        return self.held.get(rank) if self.held and self.info is not None else None


class WeightManager:
    def __init__(self, config: ModelConfig, snapshot_root: str | None, *, rank: int = 0, tp_size: int = 1,
                 fallback_dir: str | None = None, mode: str = "in_place", verify: str = "stream",
                 storage_options: dict | None = None, metrics: Metrics | None = None, drain_timeout: float = 60.0):
        if mode not in MODES:
            raise ValueError(f"swap mode must be one of {MODES}, not {mode!r}")
        if tp_size > 1 and rank != 0:
            raise ValueError(f"with tp_size {tp_size} this server loads ranks 0..{tp_size - 1} itself: leave rank at 0")
        self.config, self.snapshot_root = config, snapshot_root
        self.rank, self.tp_size = layout.check_rank(rank), tp_size
        self.fallback_dir, self.mode, self.verify = fallback_dir, mode, verify
        self.storage_options = storage_options
        self.metrics = metrics or Metrics()
        self.slots = [Slot(self._new_model()) for _ in range(2 if mode == "double_buffer" else 1)]
        self.live = self.slots[0]
        self.broken: str | None = None  # why nothing can be served, after a failed restore
        self.drain_timeout = drain_timeout
        self.on_drain_timeout = lambda slot: None  # the engine ends the slot's requests ("abort")
        self._cond = threading.Condition()
        self._paused = False  # in_place: new requests wait while an update writes
        self._update_lock = threading.Lock()
        self.updating: str | None = None  # the version an update in progress is loading (others get 409)
        self._base: Callable[[], Mapping[str, Any]] | None = None  # reads a model directory's weights again
        self._prepared: Prepared | None = None
        self._undo: Undo | None = None

    def _new_model(self) -> Decoder:
        model = Decoder(self.config)
        model.eval()
        for p in model.parameters():
            p.stop_gradient = True  # served, never trained: no autograd graph in forward
        return model

    # ---- requests ------------------------------------------------------------------------------------------

    def acquire(self, version: str | None = None) -> Slot:
        """The model copy for one request, held until ``release``: the version it holds answers the whole request.
        The live copy, or with ``version`` the copy holding that version. Raises ``Busy`` while an in-place update
        writes, ``NotReady`` when nothing can be served, ``VersionUnavailable`` when no copy holds ``version``."""
        with self._cond:
            self._expire()
            if self._paused:
                raise Busy("a weight update is writing the model")
            slot = self.live
            if slot.info is None or self.broken:
                raise NotReady(self.broken or "no weights loaded yet: POST /v1/update_weights first")
            if version is not None and version != slot.info.version:
                slot = next((s for s in self.slots if s.info and s.info.version == version and not s.writing), None)
                if slot is None:
                    raise VersionUnavailable(f"weight version {version!r} is not held by this server: it serves "
                                             f"{self.live.info.version!r}" + self._spare_note())
            slot.readers += 1
            return slot

    def _spare_note(self) -> str:
        spare = next((s for s in self.slots if s is not self.live), None)
        if spare is None:
            return " (in_place: one copy, so only the version it serves)"
        held = spare.info.version if spare.info and not spare.writing else None
        return f", its spare holds {held!r}" if held else " and its spare holds none"

    def release(self, slot: Slot) -> None:
        with self._cond:
            slot.readers -= 1
            self._cond.notify_all()

    @property
    def info(self) -> WeightInfo | None:
        return None if self.broken else self.live.info

    @property
    def place(self) -> Any:
        """Where the model copies live: the engine makes its KV cache there."""
        return self.live.model.place

    @property
    def prepared(self) -> Prepared | None:
        with self._cond:
            self._expire()
            return self._prepared

    @property
    def spare(self) -> WeightInfo | None:
        """What the spare copy of ``double_buffer`` holds (and a request naming it may be answered from)."""
        with self._cond:
            self._expire()
            spare = next((s for s in self.slots if s is not self.live), None)
            return spare.info if spare is not None and not spare.writing else None

    @property
    def healthy(self) -> bool:
        return self.info is not None

    # ---- updates -------------------------------------------------------------------------------------------

    def update(self, version: str, snapshot_root: str | None = None, rank: int | None = None,
               verify: str | None = None, startup: bool = False) -> WeightInfo:
        """Loads ``version`` and makes it live, or raises ``UpdateError`` with the old version still served.
        ``startup``: the server's first load, counted apart from updates in ``/metrics``."""
        with self._updating(version, startup) as start:
            info = self._update(version, snapshot_root or self.snapshot_root, self.rank if rank is None else rank,
                                verify or self.verify, start)
        self.metrics.update_done("success", info.seconds, info.bytes, startup, path=info.path)
        self.metrics.set_version(info.version)
        return info

    def prepare(self, version: str, snapshot_root: str | None = None, rank: int | None = None,
                verify: str | None = None, ttl: float = PREPARE_TTL) -> Prepared:
        """Phase one of a fleet's flip: makes ``version`` ready to serve without serving it, or raises
        ``UpdateError`` with nothing served changed. ``double_buffer`` loads the spare and proves it by digest;
        ``in_place`` checks everything but the bytes (it holds one copy). Replaces an earlier prepare; expires
        after ``ttl`` seconds without a commit."""
        if not 0 < ttl <= 86400:
            raise SnapshotRejected(f"ttl must be between 0 and 86400 seconds, not {ttl}", "invalid_request")
        root, rank = snapshot_root or self.snapshot_root, self.rank if rank is None else rank
        verify = verify or self.verify
        with self._updating(version, False) as start:
            self._drop_prepared()
            if self.mode == "in_place":
                self._check(version, root, rank, verify, self.live)
                info, slot = WeightInfo(version, root, rank, -1, "checked, not loaded", time.time(), 0,
                                        time.perf_counter() - start, ""), None
            else:
                slot = self._spare()
                if not (slot.info and (slot.info.version, slot.info.snapshot_root) == (version, root)):
                    self._prove(slot, self._load(slot, version, root, rank, verify, start))
                info = slot.info
            prepared = Prepared(info, verify, time.monotonic() + ttl, slot)
            with self._cond:
                self._prepared = prepared
        if slot is not None:
            self.metrics.update_done("success", info.seconds, info.bytes, path=info.path)
        return prepared

    def commit(self, version: str) -> WeightInfo:
        """Phase two: serves the prepared ``version`` (``double_buffer``: a pointer flip; ``in_place``: the update
        itself). A commit of the version already live, prepared or not, answers what is live (a retried commit)."""
        with self._updating(version, False) as start:
            with self._cond:
                self._expire()
                prepared, live = self._prepared, self.live.info
                if prepared is None or prepared.info.version != version:
                    if live is not None and live.version == version and not self.broken:
                        return live
                    held = f"{prepared.info.version!r} is prepared" if prepared else "nothing is prepared"
                    raise NotPrepared(f"cannot commit {version!r}: {held} (never prepared, replaced, aborted or "
                                      f"expired); still serving {self._serving()}: prepare it first")
                self._prepared = None
            if prepared.slot is None:
                info = self._update(version, prepared.info.snapshot_root, prepared.info.rank, prepared.verify, start)
                self.metrics.update_done("success", info.seconds, info.bytes, path=info.path)
            else:
                info = self._switch(prepared.slot)
        self.metrics.set_version(info.version)
        return info

    def abort(self, version: str | None = None) -> Prepared | None:
        """Drops what ``prepare`` made ready (only if it is ``version``, when given); returns it. The spare stops
        answering requests that name it. Nothing served changes."""
        with self._cond:
            self._expire()
            prepared = self._prepared
            if prepared is None or (version is not None and prepared.info.version != version):
                return None
            self._drop_prepared()
            return prepared

    def _drop_prepared(self) -> None:
        with self._cond:
            prepared, self._prepared = self._prepared, None
            if prepared is not None and prepared.slot is not None and prepared.slot is not self.live:
                prepared.slot.info = None  # no request may name a version the fleet did not commit

    def _expire(self) -> None:
        """Called with the condition held, wherever prepared state is read: a prepare whose commit never came
        is dropped once its time is up."""
        if self._prepared is not None and time.monotonic() >= self._prepared.expires:
            log.warning("prepared %s expired without a commit: dropped", self._prepared.info.version)
            self._drop_prepared()

    @contextlib.contextmanager
    def _updating(self, version: str, startup: bool) -> Iterator[float]:
        """One update, prepare or commit at a time: others are refused at once (``UpdateBusy``). Yields the start
        time; a failure is counted under its outcome."""
        if not self._update_lock.acquire(blocking=False):
            self.metrics.update_done("busy", 0.0, 0, startup)
            raise UpdateBusy(f"another weight update (to {self.updating!r}) is in progress; retry when it finishes")
        self.updating = version
        start = time.perf_counter()
        try:
            yield start
        except UpdateError as exc:
            self.metrics.update_done(exc.outcome, time.perf_counter() - start, 0, startup)
            raise
        finally:
            self.updating = None
            self._update_lock.release()

    def adopt(self, version: str, where: str, weights: Callable[[], Mapping[str, Any]]) -> WeightInfo:
        """Serves ``weights()`` (a model directory's, e.g. ``infer.hf.read_model_dir``) as ``version`` before any
        snapshot: level 0 in ``GET /v1/weights``. ``weights`` is kept to put them back if an in-place update fails
        midway. Counted as a start-up load."""
        start = time.perf_counter()
        slot = self.live
        try:
            state = weights()
            load_state(slot.model, state)
        except (OSError, ValueError) as exc:
            self.metrics.update_done("bad_snapshot", time.perf_counter() - start, 0, True)
            raise SnapshotRejected(f"{where}: could not load its weights: {exc}") from exc
        self._base, self._undo, slot.held = weights, None, None
        params = slot.model.state_dict()
        slot.info = WeightInfo(version, where, 0, 0, "model directory", time.time(),
                               sum(int(t.numel()) * t.element_size() for t in params.values()),
                               time.perf_counter() - start, state_digest(params))
        self.metrics.update_done("success", slot.info.seconds, slot.info.bytes, True)
        self.metrics.set_version(version)
        return self._switch(slot)

    def _ranks(self, rank: int) -> list[int]:
        return [layout.check_rank(rank)] if self.tp_size == 1 else list(range(self.tp_size))

    def _targets(self, slot: Slot, rank: int, delta: bool = False) -> dict[str, Any]:
        state = slot.model.state_dict()
        if self.tp_size == 1:
            return state
        views = shard_views(state, rank, self.tp_size)
        return private_replicas(views) if delta and rank > 0 else views

    def _spare(self) -> Slot:
        return next(s for s in self.slots if s is not self.live)

    def _update(self, version: str, snapshot_root: str, rank: int, verify: str, start: float) -> WeightInfo:
        prepared = self.prepared
        if prepared is not None and prepared.info.version != version:
            self._drop_prepared()  # the spare is about to be written: what was prepared there is gone
        target = self.live if self.mode == "in_place" else self._spare()
        if target is not self.live and target.info and \
                (target.info.version, target.info.snapshot_root) == (version, snapshot_root):
            with self._cond:
                self._prepared = None  # prepared or not, it is served now
            return self._switch(target)  # double_buffer: the spare already holds it (a rollback), switch back
        undo, self._undo = self._undo, None
        if undo is not None and target.info and target.info.version == undo.version and \
                (undo.previous.version, undo.previous.snapshot_root) == (version, snapshot_root):
            info = self._reverse(undo, target, start)
            if info is not None:
                return self._switch(target)
        previous, held = target.info, target.held
        sources = self._load(target, version, snapshot_root, rank, verify, start)
        if target is self.live and previous is not None and all(len(plan) == 1 and plan[0].is_delta
                                                                for _, plan, *_ in sources):
            self._undo = Undo(version, previous, sources, held)
        return self._switch(target)

    def _load(self, target: Slot, version: str, snapshot_root: str, rank: int, verify: str, start: float) -> list:
        """Writes ``version`` into ``target`` and records it there; returns the sources it applied."""
        sources = self._check(version, snapshot_root, rank, verify, target)
        previous = target.info
        with self._exclusive(target):
            try:
                digests = self._write(sources, target)
            except Exception as exc:  # noqa: BLE001 - whatever broke the write, undo it before reporting
                self._recover(target, previous, exc)
            target.info = self._describe(version, snapshot_root, rank, sources, target, start, digests)
        log.info("loaded %s from %s (level %d) in %.2fs", version, snapshot_root, target.info.level,
                 target.info.seconds)
        return sources

    def _prove(self, slot: Slot, sources: list) -> None:
        """The spare holds exactly what each rank's manifest says (its digest), or it is dropped and the prepare
        refused. A device's weights are not copied to the host for it: there the parts' checksums stand."""
        if slot.model.on_gpu:
            return
        for r, plan, *_ in sources:
            expected = plan[-1].manifest.digest if plan[-1].manifest else None
            record = slot.record(r)
            if expected is None or (self.tp_size == 1 and slot.info.digest == expected) or \
                    (record is not None and record[0] == expected):
                continue  # a level without a manifest has no digest to prove; an equal server digest proves it
            got = snapshot_digest(self._targets(slot, r), plan[-1].index())
            if got != expected:
                version, slot.info = slot.info.version, None
                raise SnapshotRejected(f"{version} rank {r}: the prepared copy digests to "
                                       f"{got}, its manifest says {expected}: not served; publish it again")

    def _reverse(self, undo: Undo, slot: Slot, start: float) -> WeightInfo | None:
        """Takes ``slot`` from the delta it holds back to that delta's base by applying the delta again, proven by
        the base's sums (advanced from the changed elements: they must come back to the base's record, tensor by
        tensor) or else its digest; None (the slot's record cleared, so the caller loads the base in full) when that
        fails."""
        on_gpu = slot.model.on_gpu
        try:
            with self._exclusive(slot):
                held, slot.info, slot.held, proven = slot.held or {}, None, None, {}
                views = {r: self._targets(slot, r, delta=True) for r, *_ in undo.sources}  # before a write
                for r, plan, verify, _ in undo.sources:
                    targets = views[r]
                    mine, base = held.get(r), (undo.held or {}).get(r)
                    sums = dict(mine[1]) if mine and base and verify != "full" else None
                    deltaload.apply_delta(plan[0], targets, verify=verify, sums=sums,
                                          copy_fn=kernels.cast_copy_ if on_gpu else None)
                    if sums is not None:
                        if sums != base[1]:
                            raise ValueError("the tensors' sum64 after reversing differ from the base's")
                        proven[r] = base
                        continue
                    got = snapshot_digest(targets, plan[0].index())
                    if got != plan[0].manifest.base.digest:
                        raise ValueError(f"digest {got} after reversing, the base's is {plan[0].manifest.base.digest}")
                slot.held = proven
                slot.info = WeightInfo(**{**undo.previous.__dict__, "loaded_at": time.time(),
                                          "bytes": sum(src.bytes for _, plan, *_ in undo.sources for src in plan),
                                          "seconds": time.perf_counter() - start, "path": "delta reversed"})
        except Exception as exc:  # noqa: BLE001 - the full load that follows rewrites every byte
            log.warning("reversing %s to %s failed (%s): loading %s in full", undo.version, undo.previous.version,
                        exc, undo.previous.version)
            return None
        log.info("reversed %s to %s in %.3fs", undo.version, undo.previous.version, slot.info.seconds)
        return slot.info

    def _check(self, version: str, snapshot_root: str, rank: int, verify: str, target: Slot) -> list:
        """Every rank's source, resolved and checked against the target before anything is written."""
        if verify not in ("full", "stream", "none"):
            raise SnapshotRejected(f"verify must be 'full', 'stream' or 'none', not {verify!r}", "invalid_request")
        if snapshot_root is None:
            raise SnapshotRejected(f"no snapshot_root for {version!r}: this server was started without "
                                   "--snapshot-root, so the request must name one", "invalid_request")
        try:
            layout.check_id(version)
            sources = []
            for r in self._ranks(rank):
                targets = self._targets(target, r)
                plan = load_plan(snapshot_root, version, r, targets, base_digest=self._base_digest(target, r),
                                 fallback_dir=self.fallback_dir, storage_options=self.storage_options)
                from_live = len(plan) > 1 and target is not self.live and \
                    self._base_digest(self.live, r) == plan[-1].manifest.base.digest
                if from_live:
                    plan = plan[-1:]  # the live copy holds the base: the spare starts as a copy of it (_write)
                for src in plan:
                    check_source(src, targets, verify=verify, cast=True)
                sources.append((r, plan, verify, from_live))
            return sources
        except (storage.SnapshotError, FileNotFoundError, ValueError, TypeError) as exc:
            raise SnapshotRejected(f"version {version!r} was not loaded, still serving {self._serving()}: {exc}") \
                from exc
        except OSError as exc:
            raise StorageUnavailable(f"storage error while checking {version!r} under {snapshot_root} (still serving "
                                     f"{self._serving()}): {exc}") from exc

    @contextlib.contextmanager
    def _exclusive(self, slot: Slot) -> Iterator[None]:
        """No request reads ``slot`` inside: in_place stops admitting and drains running requests; the spare of
        double_buffer only drains requests that started before the last switch. Requests still running after
        ``drain_timeout`` seconds are ended (``finish_reason: "abort"``)."""
        with self._cond:
            self._paused = slot is self.live
            slot.writing = True
            if not self._cond.wait_for(lambda: slot.readers == 0, self.drain_timeout):
                log.warning("%d requests still running after the %.0fs drain timeout: aborting them", slot.readers,
                            self.drain_timeout)
                self.on_drain_timeout(slot)
                self._cond.wait_for(lambda: slot.readers == 0)
        try:
            yield
        finally:
            with self._cond:
                self._paused = slot.writing = False
                self._cond.notify_all()

    def _base_digest(self, slot: Slot, rank: int) -> str | None:
        """The digest of ``slot``'s rank state as its record says it (no hashing), else ``_digest_of``; ``""``
        (matches no base) for a spare that holds no version: a delta starts it from the live copy instead."""
        record = slot.record(rank)
        if record:
            return record[0]
        return "" if slot.info is None and slot is not self.live else self._digest_of(slot)

    def _digest_of(self, slot: Slot) -> str | None:
        """The digest ``storage`` would compute for ``slot``'s rank state, when its record already says it (one
        rank): hashed on the host, or, for a device's ``sum64``, the xxh3 digest of the version whose manifest
        records that ``sum64`` (``published_digest``: proven without copying the weights out). A device copy with no
        record holds no version worth reading out to hash: ``""`` matches no base."""
        from infer.digest import published_digest

        info = slot.info
        if info is None and slot.model.on_gpu and self.tp_size == 1:
            return ""
        if info is None or self.tp_size != 1:
            return None
        if not info.digest.startswith("sum64-"):
            return info.digest
        return published_digest(info.digest, info.snapshot_root, info.version, info.rank,
                                fallback_dir=self.fallback_dir, storage_options=self.storage_options)

    def _write(self, sources: list, slot: Slot) -> list[str | None]:
        """Applies every rank's plan; returns each rank's digest where a delta's check computed it, and records in
        ``slot.held`` what each rank provably holds. A delta onto the base the copy's record names is proven by sum64
        from its changed elements (``verify="full"``: over the whole model, as a full load is)."""
        from infer.digest import matching_sum64

        on_gpu = slot.model.on_gpu
        in_place = on_gpu and self.tp_size == 1  # a device checks a delta's result where the weights live
        from_live = any(from_live for *_, from_live in sources)
        held = {r: (self.live if from_live else slot).record(r) for r, *_ in sources}
        if from_live:
            self._copy_live(slot)
        slot.info, slot.held = None, None  # from the first byte written until success, this copy holds no version
        digests, records = [], {}
        views = {r: self._targets(slot, r, any(s.is_delta for s in plan)) for r, plan, *_ in sources}  # before a write
        for r, plan, verify, _ in sources:
            base = held.get(r)
            short = len(plan) == 1 and plan[0].is_delta and verify != "full" and base is not None and \
                base[0] == plan[0].manifest.base.digest
            targets, _, digest, sums = apply_plan(
                plan, views[r], verify="none" if verify == "none" else "stream", cast=True,
                copy_fn=kernels.cast_copy_ if on_gpu else None, xor_fn=kernels.xor_at_ if on_gpu else None,
                digest_fn=matching_sum64 if in_place else None, held_sums=base[1] if short else None)
            digests.append(digest)
            records[r] = self._record(plan[-1], targets, sums)
        slot.held = {r: rec for r, rec in records.items() if rec is not None}
        return digests

    @staticmethod
    def _record(src, targets: Mapping[str, Any], sums: dict[str, int] | None) -> tuple[str, dict[str, int]] | None:
        """What a rank provably holds after ``src`` was applied: the sums a delta's proof advanced, else each
        tensor's sum64 computed where it lives (the pass that gives the server its digest), kept when they are the
        version's."""
        from infer.digest import tensor_sums

        manifest = src.manifest
        if manifest is None or manifest.sum64 is None or manifest.digest is None:
            return None
        if sums is None:
            index = src.index()
            sums = tensor_sums(targets, index)
            if sums is None or storage.digest.sums_digest(index, sums) != manifest.sum64:
                return None
        return manifest.digest, sums

    def _copy_live(self, spare: Slot) -> None:
        """double_buffer: the spare becomes a copy of the live weights, the base a delta applies to (a memory copy,
        not the read of a chain from storage). The live copy is only read; requests keep using it."""
        import paddle

        live = self.live.model.state_dict()
        with paddle.no_grad():
            for name, p in spare.model.state_dict().items():
                paddle.assign(live[name], output=p)

    def _recover(self, slot: Slot, previous: WeightInfo | None, exc: Exception) -> None:
        """Called with the write half done: put the previous version back, then raise what happened."""
        if slot is not self.live:
            raise SnapshotRejected(f"writing the spare copy failed ({exc}); the live copy was never touched, "
                                   f"still serving {self._serving()}") from exc
        if previous is None:
            raise SnapshotRejected(f"update failed midway ({exc}) and there was no earlier version to restore") \
                from exc
        try:
            restore_start = time.perf_counter()
            if previous.level == 0 and self._base is not None:
                slot.held = None
                load_state(slot.model, self._base())
            else:
                self._write(self._check(previous.version, previous.snapshot_root, previous.rank, "stream", slot), slot)
            slot.info = previous
            log.warning("update failed midway (%s); restored %s in %.2fs", exc, previous.version,
                        time.perf_counter() - restore_start)
        except Exception as restore_exc:  # noqa: BLE001
            self.broken = (f"update failed midway ({exc}) and restoring {previous.version!r} failed too "
                           f"({restore_exc}): not serving a torn model")
            log.error(self.broken)
            raise RestoreFailed(self.broken) from exc
        raise SnapshotRejected(f"update failed midway ({cause(exc)}); restored {previous.version!r}: still serving "
                               f"{previous.version!r}", "restored") from exc

    def _describe(self, version: str, snapshot_root: str, rank: int, sources: list, slot: Slot,
                  start: float, digests: list[str | None]) -> WeightInfo:
        levels = sorted({int(plan[-1].level) for _, plan, *_ in sources})
        record = slot.held.get(sources[0][0]) if self.tp_size == 1 and slot.held else None
        if record is not None:  # the copy provably holds the version: its manifest's digest in the slot's scheme
            manifest = sources[0][1][-1].manifest
            digest = manifest.sum64 if slot.model.on_gpu else manifest.digest
        elif self.tp_size == 1 and digests[0] is not None and digests[0].startswith("sum64-") == slot.model.on_gpu:
            digest = digests[0]  # the delta's check hashed this very state already, in the slot's own scheme
        else:
            digest = state_digest(slot.model.state_dict())  # part of the update's cost, so inside its seconds
        last = sources[0][1][-1]
        return WeightInfo(version, snapshot_root, rank, levels[0], last.level.label, time.time(),
                          sum(src.bytes for _, plan, *_ in sources for src in plan), time.perf_counter() - start,
                          digest, sources[0][1].path)

    def _switch(self, slot: Slot) -> WeightInfo:
        with self._cond:
            self.live = slot
            self.broken = None
        return slot.info

    def _serving(self) -> str:
        info = self.info
        return repr(info.version) if info else "nothing (no version loaded)"
