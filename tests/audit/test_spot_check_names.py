"""Decode spot-checks name their files after sample keys read from the shards: a key that is not
a Lumo sample key (a forged tar member `../../x.json`) is refused before any file is written."""

from __future__ import annotations

import io
import tarfile

import pytest

from lumo_core.audit.tokenizer_checks import decode_spot_checks
from lumo_core.config import load_uti_config
from lumo_core.errors import DamagedFileError
from lumo_core.tokenize.sample_layout import check_sample_key
from lumo_core.tokenize.shard_index import read_index
from lumo_core.tokenize.staging import committed_build
from lumo_core.uti.unified import UnifiedTokenizer
from tests.lm_fixtures import lm_outputs


@pytest.mark.parametrize("key", ["../../evil", "/tmp/evil", "a/b-0123456789ab", "x.y-0123456789ab", "", None])
def test_only_plain_sample_keys_pass(tmp_path, key):
    with pytest.raises(DamagedFileError, match="is not a Lumo sample key"):
        check_sample_key(key, tmp_path / "shard.tar")
    assert check_sample_key("t2i_0007-0123456789ab", tmp_path) == "t2i_0007-0123456789ab"


def test_a_forged_key_in_a_shard_stops_the_spot_checks_before_any_file(tmp_path, tokenized_sample):
    settings = lm_outputs(tmp_path, tokenized_sample)
    shards = committed_build(settings.layout.tokenized_shards)
    name = read_index(shards)["splits"]["train"]["shards"][0]["name"]
    # Every sample of the first shard renamed to one key that climbs out of the output folder.
    forged = io.BytesIO()
    with tarfile.open(shards / name) as source, tarfile.open(fileobj=forged, mode="w") as target:
        first = None
        for member in source:
            key, ext = member.name.split(".", 1)
            first = first or key
            if key != first:
                continue
            data = source.extractfile(member).read()
            member.name = f"../../evil.{ext}"
            target.addfile(member, io.BytesIO(data))
    (shards / name).write_bytes(forged.getvalue())
    tokenizer = UnifiedTokenizer(load_uti_config(settings.uti_config))
    out = tmp_path / "audit" / "spot_checks"
    with pytest.raises(DamagedFileError, match=r"sample key '\.\./\.\./evil' is not a Lumo sample key"):
        decode_spot_checks(shards, out, tokenizer, n=1000, seed=0)
    assert not list(tmp_path.rglob("evil.*"))
