"""What a labelling run will take, from what `mealv2 label --dry-run` measured: plain arithmetic on the
measured rate and bytes, kept apart from the measuring so that each figure can be checked by hand."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..common.store.label_store import DATA_ARRAYS

# S3 Standard list prices (us-east-1) in USD per request, as README's "What it costs" quotes them: PUT, COPY,
# POST and LIST per 1,000 requests $0.005, GET and HEAD $0.0004; DELETE is free.
PUT_USD, GET_USD = 0.005 / 1000, 0.0004 / 1000
KEYS_PER_DELETE = 1000   # keys one DELETE request of S3 removes
# Requests of any run whatever its size (counted on moto's server): HEAD and LIST of the store's root as each
# rank opens it, and rank 0's more; LIST of the whole store (opened, packed, measured).
ROOT_LOOKUPS = (2, 3)    # per rank, and once
WHOLE_LISTINGS = (2, 5)  # per rank, and once
RUN_PUTS = 4             # PUT requests of any run: its record, the lease taken and its two conditional PUTs probed


@dataclass(frozen=True)
class LabelCost:
    """A dry run's measurements and the run they predict (``mealv2 label --dry-run`` prints :meth:`lines`)."""

    crops: int               # crops the run will label: every (round, shard) not labelled yet
    units: int               # those (round, shard) work units
    store_crops: int         # crops of the finished store (rounds x images x crops per image)
    rounds: int
    shards: int
    ranks: int               # processes sharing the work (torchrun), each assumed as fast as the one measured
    measured_crops: int      # crops timed (after a warm-up batch)
    crops_per_s: float       # their rate: the run's loader, teachers and top-k code on the chosen device
    startup_s: float         # what the warm-up batch took beyond its crops at that rate (loader built, first forwards)
    write_s: float           # a shard's chunks written and marked, measured on the measured crops
    pack_s: float            # a round packed into its objects, measured likewise
    device: str
    bytes_per_crop: float    # the measured crops' chunks as the store encodes and packs them
    objects: int             # objects (files) of the finished store
    url: str | None = None   # the store's s3:// URL, whose requests are counted
    lease_s: float = 60.0    # the lease's duration; it is renewed every quarter of it
    arrays: int = len(DATA_ARRAYS)   # per-crop arrays a work unit writes (2 more per teacher with --keep-teachers)

    @property
    def seconds(self) -> float:
        """Labelling time: the start-up once; the crops, shared by the ranks, at the measured rate, or their
        shards' writes where those take longer (a background thread writes shards while the teachers run);
        then each round's packing."""
        labelling = max(self.crops / self.crops_per_s, self.units * self.write_s) / self.ranks
        return self.startup_s + labelling + math.ceil(self.units / self.shards) * self.pack_s

    @property
    def store_bytes(self) -> float:
        return self.bytes_per_crop * self.store_crops

    def s3_requests(self) -> dict[str, int]:
        """Requests of labelling into S3 (docs/STORE.md, "Writing to S3"), as counted on moto's server
        (tests/test_store_report.py; with two ranks on one machine: PUT, HEAD and LIST as predicted, GET only the
        lease read back and watched).
        PUT: per work unit its data chunks and its done mark, the images' CRC32Cs once per shard, each object
        of the finished store once, the run's record, the lease (taken, its conditional writes probed, renewed
        every quarter of its duration). HEAD and LIST: every rank looks up each done mark of the store not
        written yet (a HEAD and a LIST each) and each round's done row, rank 0 the rows once more as it packs,
        and each staged folder is listed before it is deleted. GET, at most: packing reads back the chunks
        other ranks wrote, unless they ran on its machine (ranks of a machine share its cache), rank 0 reads the
        lease back once taken, and each other rank reads it as it is renewed (it watches it). DELETE: the staged
        objects of each packed round, 1,000 keys a request, and the lease (probed with a wrong If-Match, then
        released). A run cut short and resumed repeats some of them."""
        arrays = self.arrays
        rounds = math.ceil(self.units / self.shards)
        folders = rounds * (arrays + 1) + 1   # a packed round's staged arrays, and the images' CRC32Cs
        lookups = self.ranks * (self.units + rounds + ROOT_LOOKUPS[0]) + rounds + ROOT_LOOKUPS[1]
        beats = int(self.seconds // (self.lease_s / 4))
        return {"PUT": self.units * (arrays + 1) + self.shards + self.objects + RUN_PUTS + beats,
                "HEAD": lookups, "LIST": lookups + folders + self.ranks * WHOLE_LISTINGS[0] + WHOLE_LISTINGS[1],
                "GET": (self.units * arrays + self.shards) * (self.ranks - 1) // self.ranks
                       + 1 + (self.ranks - 1) * (1 + beats),
                "DELETE": folders * math.ceil(self.shards / KEYS_PER_DELETE) + 2}

    def lines(self) -> list[str]:
        ranks = f", the crops shared by {self.ranks} ranks" if self.ranks > 1 else ""
        out = [f"dry run: nothing written (no store, no lock, no lease); {self.measured_crops:,} crops timed on "
               f"{self.device} after a warm-up batch: {self.crops_per_s:.1f} crops/s (crops rendered, the teachers' "
               f"forward, top-k code)",
               f"the run: {self.crops:,} crops to label ({self.units:,} of its {self.rounds} rounds x {self.shards:,} "
               f"shards): {self.seconds:,.0f} s ({self.seconds / 3600:.2f} h) of teacher forward at the measured "
               f"rate{ranks}, a start-up of {self.startup_s:.1f} s and packing {self.pack_s:.2f} s per round included "
               f"(the dataset index and a new store's teacher check come before it)",
               f"the store: {self.bytes_per_crop:.2f} B/crop (the measured crops as the store encodes them) x "
               f"{self.store_crops:,} crops = {_size(self.store_bytes)} of labels, {self.objects:,} objects once "
               f"finished"]
        if self.url is not None:
            n = self.s3_requests()
            usd = (n["PUT"] + n["LIST"]) * PUT_USD + (n["GET"] + n["HEAD"]) * GET_USD
            out.append(f"{self.url}: about {', '.join(f'{v:,} {k}' for k, v in n.items())} requests (the lease's "
                       f"renewals included; the GETs at most: none when the ranks share a machine), ${usd:.2f} at "
                       f"S3 Standard list prices (README: What it costs)")
        return out


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"
