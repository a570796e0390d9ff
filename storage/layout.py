"""File names of a snapshot, and the checks that keep ids and ranks from becoming paths.

The names are FastDeploy's (``fastdeploy/rl/dynamic_weight_manager.py``) so that either side can read what
the other wrote. Ids are restricted to ``[A-Za-z0-9_-]`` with no dots: a dot would make
``model_state.tp0.{id}.pdparams`` ambiguous with a part name (id ``v1.part3`` vs id ``v1`` part 3).
"""

from __future__ import annotations

import enum
import re

# Six digits, as ``flows.fleet`` reads '#rank=': far more ranks than any tensor-parallel group has, and few
# enough that a rank given as text is checked by its length before it becomes an int.
MAX_RANK = 999_999
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_MANIFEST_RE = re.compile(r"model_state\.tp(\d+)\.([A-Za-z0-9][A-Za-z0-9_-]*)\.manifest\.json")


class Level(enum.IntEnum):
    """Where a snapshot was found, in the order the loader tries them."""

    PARTS = 1
    FULL = 2
    LEGACY = 3
    FALLBACK = 4

    @property
    def label(self) -> str:
        return {1: "chunked parts", 2: "single full file", 3: "legacy name", 4: "shared fallback dir"}[self.value]


def check_id(version: object) -> str:
    """Refuse ids that could escape the root or collide with another file name."""
    if not isinstance(version, str) or not ID_PATTERN.fullmatch(version):
        raise ValueError(
            f"invalid snapshot id {version!r}: use 1-128 characters from [A-Za-z0-9_-], starting with a "
            "letter or digit (no '/', '..', dots, spaces or other path syntax), e.g. 'step-120'"
        )
    return version


def check_rank(rank: object) -> int:
    """``rank`` if it is an int from 0 to ``MAX_RANK``; otherwise a ValueError that shows at most ~40 characters
    of it (an int too long for ``str`` is shown by its last digits and its length)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= MAX_RANK:
        raise _invalid_rank(rank)
    return rank


def parse_rank(text: str) -> int:
    """A rank written in decimal (a command-line argument), checked as ``check_rank`` does before it becomes an
    int, so that no length of digits reaches Python's own limit on converting text to int."""
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_RANK)):
        raise _invalid_rank(text)
    return check_rank(int(text))


def _invalid_rank(value: object) -> ValueError:
    return ValueError(f"invalid rank {_shown(value)}: a rank is an integer from 0 to {MAX_RANK} "
                      "(0 for a single server)")


def _shown(value: object) -> str:
    """``value`` for an error message, cut to about 40 characters. A large int is never converted whole: Python
    refuses ``str`` of an int longer than 4300 digits, and converting one takes time quadratic in its length."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        digits = int(value.bit_length() * 0.30103) + 1  # log10(2): within one of the true count
        return f"{'-' if value < 0 else ''}…{abs(value) % 10**20:020d} (an integer of about {digits} digits)"
    shown = repr(value)
    return shown if len(shown) <= 40 else f"{shown[:30]}… ({len(shown)} characters)"


def base_name(rank: int, version: str) -> str:
    return f"model_state.tp{check_rank(rank)}.{check_id(version)}"


def part_name(rank: int, version: str, index: int) -> str:
    return f"{base_name(rank, version)}.part{index}.pdparams"


def delta_name(rank: int, version: str, index: int) -> str:
    """A delta version's file N. Not ``.part{N}.pdparams``: FastDeploy's loader globs
    ``model_state.tp{R}.{G}.part*.pdparams`` (``fastdeploy/rl/dynamic_weight_manager.py``) and would take a
    delta's changed elements for whole tensors."""
    return f"{base_name(rank, version)}.delta{index}.safetensors"


def delta_regex(rank: int, version: str) -> re.Pattern[str]:
    return re.compile(re.escape(base_name(rank, version)) + r"\.delta(\d+)\.safetensors")


def full_name(rank: int, version: str) -> str:
    return f"{base_name(rank, version)}.pdparams"


def legacy_name(version: str) -> str:
    """Old FastDeploy naming: rank 0 glued to the id, e.g. ``model_state.tp012.pdparams`` for id 12."""
    return f"model_state.tp0{check_id(version)}.pdparams"


def manifest_name(rank: int, version: str) -> str:
    return f"{base_name(rank, version)}.manifest.json"


def pending_name(rank: int, version: str) -> str:
    """Marker a publisher writes before its first part and removes after the manifest.

    It lets the compatibility mode (parts without a manifest, as FastDeploy's trainer writes them) tell a
    killed Baton publish apart from a finished foreign one.
    """
    return f"{base_name(rank, version)}.publishing"


def part_regex(rank: int, version: str) -> re.Pattern[str]:
    return re.compile(re.escape(base_name(rank, version)) + r"\.part(\d+)\.pdparams")


def parse_manifest_name(file_name: str) -> tuple[int, str] | None:
    m = _MANIFEST_RE.fullmatch(file_name)
    return (int(m.group(1)), m.group(2)) if m else None
