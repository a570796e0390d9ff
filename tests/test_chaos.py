"""Fault injection, the fast cases of ``harness/chaos/``: real SIGKILLs of publishers, servers and the S3 server,
real byte flips, real races. Each asserts that nothing was lost or corrupted (0 BAD); the full counts are the
benchmark's (``python bench/chaos.py``, figures in bench/REPORT.md)."""

from __future__ import annotations

import logging
import random

import pytest

from harness import chaos

logging.getLogger("httpx").setLevel(logging.WARNING)


def no_bad(tally: chaos.Tally) -> None:
    assert tally.bad == 0, f"{tally.scenario}: {tally.bad_examples}"
    assert tally.checks > 0, f"{tally.scenario}: nothing was checked"


def test_publisher_sigkilled_at_random_moments_never_yields_a_torn_or_lost_version(tmp_path):
    tally = chaos.Tally("publisher kills")
    chaos.publisher_kills(tally, str(tmp_path / "snap"), kills=3, rng=random.Random(1))
    no_bad(tally)
    assert tally.faults == 3
    assert tally.counts["refused_clean"] + tally.counts["succeeded"] == tally.checks


@pytest.mark.parametrize("verify", ["full", "stream"])
def test_every_header_and_manifest_byte_flipped_and_sampled_data_bytes(tmp_path, verify):
    """XOR 0xFF on every byte of the manifest and of each part's header and on every 97th data byte: with
    ``"full"`` each flip is refused before the target changes; with ``"stream"`` a flip in data is caught after
    the part was applied and reported as a PartialApplyError naming every changed tensor."""
    tally = chaos.Tally(f"flips {verify}")
    chaos.byte_flips(tally, tmp_path, 0xFF, verify, data_stride=97)
    no_bad(tally)
    assert tally.faults > 2000
    if verify == "full":
        assert tally.counts["refused_clean"] == tally.checks
    else:
        assert tally.counts["partial"] == tally.notes["data: partial"] > 0


def test_low_bit_flips_of_the_manifest_are_refused_or_provably_harmless(tmp_path):
    """XOR 0x01 keeps JSON text ASCII, so the flip edits a value instead of breaking the UTF-8: what still loads
    bit-exact changed only fields a load does not use (sha256 is for audits, published_at orders versions)."""
    tally = chaos.Tally("low-bit flips")
    chaos.byte_flips(tally, tmp_path, 0x01, "full", text_only=True)
    no_bad(tally)
    harmless = {note.split(": ", 1)[1] for note in tally.notes if note.startswith("harmless manifest field")}
    assert "parts[].sha256" in harmless and "published_at" in harmless
    assert not any("xxh3" in h or "shape" in h or "dtype" in h for h in harmless), harmless


def test_a_header_naming_a_tensor_twice_is_refused_even_without_checksums(tmp_path):
    found = chaos.header_name_duplicate(tmp_path)
    assert found["kind"] == "refused_clean", found


@pytest.mark.parametrize("mode,verify", [("overwrite", "stream"), ("rename", "full")])
def test_a_part_replaced_during_loads(tmp_path, mode, verify):
    tally = chaos.Tally(f"replace {mode}")
    chaos.replace_race(tally, str(tmp_path / "snap"), mode, loads=60, verify=verify)
    no_bad(tally)


def test_prune_racing_loads(tmp_path):
    tally = chaos.Tally("prune race")
    chaos.prune_race(tally, str(tmp_path / "snap"), loads=60, verify="full")
    no_bad(tally)


def test_server_sigkilled_mid_update_restarts_on_one_complete_version(tmp_path):
    """Killed while it writes the live weights, the server started again with the README's command line (no
    --version) serves the newest committed version, bit-exact. The small model's update is short, so a kill
    that still lands after the reply is tried again (3 times at most)."""
    tally = chaos.Tally("server kill")
    rng = random.Random(3)
    for attempt in range(3):
        chaos.server_kills(tally, tmp_path / str(attempt), 1, "small", rng, part_bytes=256 << 10, spread=0.1,
                           writing=True)
        if tally.notes["killed mid-update"]:
            break
    no_bad(tally)
    assert tally.notes["killed mid-update"] == 1
    assert tally.counts["succeeded"] == tally.checks


@pytest.fixture(scope="module")
def s3_killed():
    """One S3 kill in the first 40% of an update of the small model (the checksum pass), then S3 back."""
    tally = chaos.Tally("s3 kill")
    statuses = chaos.s3_kills(tally, 1, "small", random.Random(5))
    return tally, statuses


def test_s3_killed_mid_update_keeps_the_old_version_and_a_later_update_succeeds(s3_killed):
    tally, statuses = s3_killed
    no_bad(tally)
    assert tally.faults == 1 and all(400 <= s < 600 or s == 200 for s in statuses["killed"])
    assert statuses["after"] == [200]


def test_an_update_while_s3_is_down_answers_503(s3_killed):
    _, statuses = s3_killed
    assert statuses["down"] == [503]
