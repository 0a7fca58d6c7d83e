"""The per-shard sample index the merge writes: it locates every sample's members exactly as
tarfile reads them, is listed with its sha256 in index.json, loads without pickle, and is
refused when missing, damaged or from an older build."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest

from lumo_core.errors import LumoError, MissingUpstreamError
from lumo_core.lm.data import SampleReader, load_catalog, open_split
from lumo_core.tokenize.sample_index import INDEX_DTYPE, READ_MEMBERS, read_sample_index
from lumo_core.tokenize.sample_layout import SAMPLE_MEMBERS, SPLITS, npy_load
from lumo_core.tokenize.shard_index import INDEX_FORMAT_VERSION
from lumo_core.uti.token_space import TokenSpace


def tar_samples(payload: bytes) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:") as tar:
        for info in tar:
            key, _, suffix = info.name.partition(".")
            samples.setdefault(key, {})[suffix] = tar.extractfile(info).read()
    return samples


def test_the_index_locates_every_sample_as_tarfile_reads_it(tokenized_sample):
    shards_dir = tokenized_sample / "tokenized_shards"
    index = json.loads((shards_dir / "index.json").read_bytes())
    assert index["format_version"] == INDEX_FORMAT_VERSION == 4
    for split in SPLITS:
        for entry in index["splits"][split]["shards"]:
            listed = entry["sample_index"]
            assert listed["name"] == f"sample_index/{entry['name'][: -len('.tar')]}.npy"
            rows = np.load(shards_dir / listed["name"], allow_pickle=False)
            assert rows.dtype == INDEX_DTYPE and len(rows) == entry["n_samples"]
            shard = (shards_dir / entry["name"]).read_bytes()
            whole = tar_samples(shard)
            assert len(whole) == len(rows)
            for row, (key, members) in zip(rows, whole.items()):
                # The sample's range holds all its members and nothing else.
                alone = tar_samples(shard[row["offset"] : row["offset"] + row["length"]])
                assert alone == {key: members} and set(members) == set(SAMPLE_MEMBERS)
                # The read range holds the members training needs, and only those.
                read = tar_samples(shard[row["read_offset"] : row["read_offset"] + row["read_length"]])
                assert read == {key: {m: members[m] for m in READ_MEMBERS}}
                meta = json.loads(members["json"])
                assert row["task"].decode() == meta["task"]
                assert row["n_tokens"] == npy_load(members["input_ids.npy"]).size
            # Seeks cover less than the shard: tar padding at the end and the members not trained on.
            assert sum(rows["read_length"]) < sum(rows["length"]) < len(shard)


def test_a_missing_damaged_or_absent_index_is_refused(tokenized_sample, tmp_path):
    shards_dir = tmp_path / "tokenized_shards"
    shutil.copytree(tokenized_sample / "tokenized_shards", shards_dir)
    space = TokenSpace.read(tokenized_sample / "token_space")
    split = open_split(shards_dir, "train", space.sha256)
    entry = split.shards[0]
    assert len(load_catalog(split)) == split.n_samples
    payload = entry.sample_index.read_bytes()
    entry.sample_index.write_bytes(payload[:-8] + bytes(8))
    with pytest.raises(LumoError, match="does not match its sha256 in index.json"):
        load_catalog(split)
    entry.sample_index.unlink()
    with pytest.raises(MissingUpstreamError, match="listed in index.json but missing"):
        load_catalog(split)
    with pytest.raises(MissingUpstreamError, match="without a sample index.*lumo tokenize"):
        read_sample_index(entry.sample_index, None, entry.n_samples)
    # A shard whose bytes moved under its index: the read is refused, naming the shard.
    entry.sample_index.write_bytes(payload)
    catalog = load_catalog(split)
    shard = bytearray(entry.path.read_bytes())
    entry.path.write_bytes(bytes(512) + shard[:-512])
    with pytest.raises(LumoError, match=f"{entry.path}.*tokenize again"):
        SampleReader(split, catalog).read(0)


def test_a_missing_or_damaged_sample_index_makes_the_build_stale_and_a_bad_name_damages_the_index(
    tokenized_sample, tmp_path
):
    from lumo_core.errors import DamagedFileError
    from lumo_core.tokenize.shard_index import check_index_names
    from lumo_core.tokenize.staging import committed_build
    from lumo_core.tokenize.staleness import stale_reason

    shards_dir = tmp_path / "tokenized_shards"
    shutil.copytree(committed_build(tokenized_sample / "tokenized_shards"), shards_dir)
    run_key = json.loads((shards_dir / "run.json").read_bytes())["run_key"]
    assert stale_reason(shards_dir, run_key) is None
    index = json.loads((shards_dir / "index.json").read_bytes())
    listed = shards_dir / index["splits"]["train"]["shards"][0]["sample_index"]["name"]
    payload = listed.read_bytes()
    listed.write_bytes(payload[:-8] + bytes(8))
    assert "sample index of shard train/shard-000000.tar" in stale_reason(shards_dir, run_key)
    listed.unlink()
    assert "sample index of shard train/shard-000000.tar" in stale_reason(shards_dir, run_key)

    index["splits"]["train"]["shards"][0]["sample_index"]["name"] = "../../outside.npy"
    with pytest.raises(DamagedFileError, match="sample index entry"):
        check_index_names(index, shards_dir / "index.json")
