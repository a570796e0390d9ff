"""Fault injection: real processes killed with SIGKILL, real bytes flipped, real storage and Prefect servers killed,
and for each fault whether anything was lost or corrupted (the goal is 0).

One module per scenario (each fault is injected for real, nothing is mocked):

1. ``kill_publishers``: a publisher SIGKILLed at random moments, on local disk and on a loopback S3 server (moto,
   its own process).
2. ``flip_bytes``: every byte of a small snapshot flipped, one at a time, loaded with ``verify="full"`` and
   ``verify="stream"``.
3. ``kill_servers``: ``baton serve`` SIGKILLed in the middle of ``POST /v1/update_weights``, then restarted.
4. ``kill_s3``: the S3 server SIGKILLed in the middle of an update, then started again.
5. ``races``: ``prune`` racing loads; a part replaced (in place, by rename, or as an S3 object) during loads.
6. ``restart_prefect``: the Prefect server killed and restarted during a ``sync-weights`` run.

What they share: ``tally`` (the bookkeeping), ``loads`` (expected versions and the judge of a load), ``servers``
(the judge of what a server serves), ``processes`` (the servers and helpers they start and kill). The helper
programs ``zygote``, ``racer``, ``rewriter`` and ``sync`` run as ``python -m harness.chaos.<name>``.

Outcomes per check: *succeeded* (the operation did what it should, bit-exact), *refused-clean* (an error, and
the target or served weights are bit-identical to before), *harmless* (a corrupted byte that changes nothing a
load returns: loaded bit-exact), *detected-partial* (``PartialApplyError`` naming every changed tensor, or a
server that stops serving rather than serve a torn model: the caller must restore), *BAD* (anything else: a
torn load, a lost version, weights changed under an error, an exception that is not a storage error).

The scenarios run from ``bench/chaos.py`` (every one, with the report) and from ``tests/test_chaos.py`` (the fast
cases).
"""

from harness.chaos.flip_bytes import byte_flips, header_name_duplicate
from harness.chaos.kill_publishers import publisher_kills
from harness.chaos.kill_s3 import s3_kills
from harness.chaos.kill_servers import server_kills
from harness.chaos.processes import BUCKET, moto_s3
from harness.chaos.races import prune_race, replace_race
from harness.chaos.restart_prefect import prefect_restarts
from harness.chaos.tally import KINDS, Tally, timed

__all__ = ["BUCKET", "KINDS", "Tally", "byte_flips", "header_name_duplicate", "moto_s3", "prefect_restarts",
           "prune_race", "publisher_kills", "replace_race", "s3_kills", "server_kills", "timed"]
