"""The real-recording check: game soundtracks from Debian packages, one tag per soundtrack.

Each soundtrack is a Debian package of recorded music (Ogg Vorbis, Opus, MP3) that ``make_catalog``
installs when it can (``system_packages.require``). Its files are found with ``dpkg -L``, kept when they
are music (under the package's music folder) and at least ``min_seconds`` long, and deduplicated by
content hash (a package may ship one recording under several names, and two packages could share one).
The bytes are copied unchanged to ``<root>/catalog/audio/<tag>-<hash>.<ext>``; the tag is the soundtrack's
name. Splits are dealt per soundtrack by seeded permutation, so each split holds every tag its size allows.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from musiclib import audio, catalog
from musiclib.core import storage
from musiclib.core.config import Layout
from musiclib.datasets import system_packages
from musiclib.datasets.demo import SPLIT_SHARES

SOUNDTRACKS = {  # tag: (Debian package, a folder its music files are under)
    "drascula": ("drascula-music", "/drascula/"),
    "hyperrogue": ("hyperrogue-music", "/music/"),
    "singularity": ("singularity-music", "/music/"),
    "planetblupi": ("planetblupi-music-ogg", "/music/"),
    "warzone2100": ("warzone2100-music", "/music/"),
    "asc": ("asc-music", "/music/"),
}
AUDIO_SUFFIXES = (".ogg", ".opus", ".mp3", ".flac", ".wav")


def package_files(package: str, under: str) -> list[Path]:
    """The audio files a package installed under a folder named ``under``, sorted (``dpkg -L``)."""
    listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    return sorted(
        Path(line)
        for line in listing.splitlines()
        if under in line and line.lower().endswith(AUDIO_SUFFIXES) and Path(line).is_file()
    )


def collect(files: dict[str, list[Path]], min_seconds: float) -> tuple[list[dict], Counter[str]]:
    """Catalog rows (without split) for each tag's files, one per distinct content, and the counts of
    files left out by reason (``duplicate``, ``too_short``, or the decoder's reason)."""
    rows, seen, skipped = [], set(), Counter()
    for tag, paths in files.items():
        for path in paths:
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(digest)
            try:
                seconds = audio.info(data).duration_s
                if seconds is None:
                    seconds = len(audio.load(data)) / audio.SAMPLE_RATE
            except audio.AudioError as exc:
                skipped[exc.reason] += 1
                continue
            if seconds < min_seconds:
                skipped["too_short"] += 1
                continue
            track_id = f"{tag}-{digest[:12]}"
            rows.append(
                {
                    "track_id": track_id,
                    "audio_uri": f"audio/{track_id}{path.suffix.lower()}",
                    "duration_s": float(seconds),
                    "tags": [tag],
                    "soundtrack": tag,
                    "source_path": str(path),
                    "sha256": digest,
                }
            )
    return rows, skipped


def deal_splits(rows: list[dict], seed: int) -> None:
    """Set each row's split: within each tag a seeded permutation dealt by ``SPLIT_SHARES``."""
    by_tag: dict[str, list[dict]] = {}
    for row in rows:
        by_tag.setdefault(row["soundtrack"], []).append(row)
    rng = np.random.default_rng(seed)
    for tag_rows in by_tag.values():
        order, start = rng.permutation(len(tag_rows)), 0
        for name, share in SPLIT_SHARES:
            stop = len(tag_rows) if name == SPLIT_SHARES[-1][0] else start + round(share * len(tag_rows))
            for k in order[start:stop]:
                tag_rows[k]["split"] = name
            start = stop


def make_catalog(root: str, min_seconds: float = 30.0, seed: int = 0, install: bool = True) -> Counter[str]:
    """Install the soundtrack packages if needed, write their catalog under ``<root>/catalog``, and
    return the counts of files left out by reason."""
    system_packages.require([package for package, _ in SOUNDTRACKS.values()], install=install)
    files = {tag: package_files(package, under) for tag, (package, under) in SOUNDTRACKS.items()}
    rows, skipped = collect(files, min_seconds)
    deal_splits(rows, seed)
    uri = Layout(root).catalog
    folder = storage.parent(uri)
    for row in rows:  # copied unchanged: the recording, not a re-encoding
        storage.write_bytes(storage.join(folder, row["audio_uri"]), Path(row["source_path"]).read_bytes())
    catalog.write(pa.Table.from_pylist(rows), uri)
    return skipped
