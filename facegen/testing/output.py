"""A finished build folder written by hand, in exactly the layout `facegen build` writes (for card/publish tests).

``write_output_folder`` writes ``data/train/train-{i:06d}.tar`` (WebDataset members ``{cls:06d}_{n:03d}.png``,
``.cls``, ``.json`` and optional extras), ``.facegen/shards/{i:06d}.json`` and ``.facegen/run.json``, then the card.
It lets card and publish code be tested with extras (``embedding.npy``), quality figures, models and licences that
the built-in passthrough does not produce, without any model.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
import xxhash

from facegen.layout import OutputFolder, shard_path
from facegen.layout.records import (
    LayoutRecord,
    LicenseRecord,
    ModelRecord,
    PlanRecord,
    PluginRecord,
    QualityTotals,
    RunOptions,
    RunRecord,
    ShardStats,
    Totals,
    WrittenBy,
)
from facegen.testing.folder import draw_face, encode

MIT = {"id": "mit", "name": "MIT", "link": "https://opensource.org/license/mit", "text": "MIT License (summary)",
       "commercial_use": True, "note": ""}
RESEARCH_ONLY = {"id": "other", "name": "Research Use of Data Agreement v1.0",
                 "link": "https://example.org/r-uda", "text": "Research use only. Full text at the link.",
                 "commercial_use": False, "note": "non-commercial research only"}
FIXTURE_CITATION = "@misc{fixture2026,\n  title = {A fixture source},\n  year = {2026}\n}"


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _features(embedding: bool, quality: bool) -> dict:
    from datasets import Features, Image, List, Value

    json_fields = {"identity": Value("string"), "source": Value("string"), "source_ref": Value("string"),
                   "image_index": Value("int32")}
    if quality:
        json_fields["cosine_to_prototype"] = Value("float32")
    columns = {"png": Image(), "cls": Value("int64"), "json": json_fields}
    if embedding:
        columns["embedding.npy"] = List(Value("float32"), length=8)
    columns["__key__"] = Value("string")
    columns["__url__"] = Value("string")
    return Features(columns).to_dict()


def write_output_folder(out: str | os.PathLike, identities: int = 6, images_per_identity: int = 3,
                        shard_size: int = 2, embedding: bool = True, quality: bool = True,
                        source_license: dict | None = None, models: list[dict] | None = None,
                        transform_license: dict | None = None, card: bool = True) -> Path:
    """Write a complete build folder (shards, stats, run.json and, unless ``card=False``, the card)."""
    out = Path(out)
    folder = OutputFolder(out)
    folder.train_dir.mkdir(parents=True, exist_ok=True)
    folder.shard_stats_dir.mkdir(parents=True, exist_ok=True)
    num_shards = (identities + shard_size - 1) // shard_size
    per_shard = [min(shard_size, identities - j * shard_size) for j in range(num_shards)]  # identities
    total_images = 0
    for shard in range(num_shards):
        tar_path = folder.shard_tar(shard)
        per_identity, quality_stats = {}, {}
        with wds.TarWriter(str(tar_path), encoder=False, mtime=0, user="facegen", group="facegen") as tar:
            for cls in range(shard * shard_size, min((shard + 1) * shard_size, identities)):
                identity = f"id{cls:04d}"
                for n in range(images_per_identity):
                    meta = {"identity": identity, "source": "fixture", "source_ref": f"{identity}/{n}.png",
                            "image_index": n}
                    if quality:
                        value = round(0.5 + 0.05 * ((cls * 7 + n * 3) % 9), 4)
                        meta["cosine_to_prototype"] = value
                        q = quality_stats.setdefault("cosine_to_prototype",
                                                     {"sum": 0.0, "count": 0, "min": value, "max": value})
                        q["sum"] += value
                        q["count"] += 1
                        q["min"], q["max"] = min(q["min"], value), max(q["max"], value)
                    sample = {"__key__": f"{cls:06d}_{n:03d}", "png": encode(draw_face(cls, n, size=48), "png"),
                              "cls": str(cls).encode(), "json": json.dumps(meta).encode()}
                    if embedding:
                        rng = np.random.default_rng(cls * 1000 + n)
                        sample["embedding.npy"] = _npy(rng.standard_normal(8).astype(np.float32))
                    tar.write(sample)
                per_identity[identity] = images_per_identity
        data = tar_path.read_bytes()
        with tarfile.open(tar_path) as tar:
            payload = sum(m.size for m in tar if m.isfile())
        images = sum(per_identity.values())
        total_images += images
        ShardStats(
            shard=shard, identities=len(per_identity), images=images, images_per_identity=per_identity, skipped={},
            failures=[], quality={name: QualityTotals(**q) for name, q in quality_stats.items()}, verify="full",
            converted={}, image_modes={"RGB": images}, image_sizes={"48x48": images}, seconds=0.01,
            started_at=0.0, finished_at=0.01, written_by=WrittenBy(process=0, processes=1, pid=0),
            tar=shard_path(shard), tar_bytes=len(data), tar_xxh3_128=xxhash.xxh3_128(data).hexdigest(),
            sample_bytes=payload, redone_because=None,
        ).write(folder.shard(shard).stats)
    run = RunRecord(
        facegen_version="0.1.0", git_revision=None,
        command=["facegen", "build", "--source", "fixture", "--source-path", "/data/fixture", "--plugin",
                 "fixture-transform", "--out", str(out)],
        created="2026-01-01T00:00:00+00:00", python="3.11.0",
        options=RunOptions(source="fixture", source_path="/data/fixture", source_opts={"parts": ["a", "b"]},
                           plugin="fixture-transform", plugin_opts={"steps": 25, "guidance": 3.0, "fp16": True},
                           recipe=None, limit_identities=None, identities_file=None, identities_file_sha256=None,
                           shard_size=shard_size, shard_samples=shard_size * images_per_identity,
                           shards_multiple_of=None, seed=7, format="png", strict=False, verify="full"),
        plan=PlanRecord(identities=identities, shards=num_shards, plan_sha256="0" * 64),
        layout=LayoutRecord(mode="per-image", units=None, identities_per_unit=None,
                            planned_shard_lengths=[n * images_per_identity for n in per_shard],
                            order="identities in plan order", units_xxh3_128=None, identities_without_images=[]),
        source=PluginRecord(name="fixture", description="A fixture source",
                            card_description="Drawn faces standing in for a synthetic-face dataset.",
                            homepage="https://example.org/fixture", citation=FIXTURE_CITATION,
                            distribution="facegen", version="0.1.0",
                            license=LicenseRecord(**(MIT if source_license is None else source_license)),
                            provenance={"parts": ["a", "b"]}),
        transform=PluginRecord(name="fixture-transform", description="A fixture transform",
                               card_description="Stands in for a realism transform.", distribution="facegen",
                               version="0.1.0",
                               license=LicenseRecord(**transform_license) if transform_license else None,
                               models=[ModelRecord(**m) for m in models or []]),
        features=_features(embedding, quality),
        image_column="png",
        quality_fields=["cosine_to_prototype"] if quality else [],
        totals=Totals(identities=identities, images=total_images, skipped={}, shards=num_shards),
    )
    run.write(folder.run_json)
    if card:
        from facegen.cards import write_card

        write_card(out)
    return out
