"""The profile/frontier cache: keys, directory and single-file caches, mismatches, corrupt files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from perseus_lightning.core.errors import PerseusInputError
from perseus_lightning.runtime.cache import CacheKey, CacheMismatchError, PlanCache, model_signature

KEY = CacheKey(model_signature="abc123", gpu_name="NVIDIA A100-SXM4-40GB", schedule="1f1b", microbatches=8, layout="pp2-dp2")
PAYLOAD = {"profile": {"stages": 2}, "frontier": [1.0, 2.0]}


def other(**changes: object) -> CacheKey:
    return CacheKey(**{**KEY.to_dict(), **changes})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- keys
def test_digest_is_stable_short_and_distinguishes_keys() -> None:
    assert KEY.digest() == CacheKey(**KEY.to_dict()).digest()
    assert re.fullmatch(r"[0-9a-f]{16}", KEY.digest())
    assert KEY.digest() == "b79998debb259159"  # changes to it orphan every user's cache
    assert len({KEY.digest(), other(microbatches=16).digest(), other(layout="pp2-dp4").digest(),
                other(gpu_name="NVIDIA H100").digest(), other(schedule="gpipe").digest()}) == 5


def test_model_signature_depends_on_names_and_shapes_not_order() -> None:
    params = [("layer.0.weight", (16, 8)), ("layer.0.bias", (16,)), ("head.weight", (4, 16))]
    assert model_signature(params) == model_signature(reversed(params))
    assert model_signature(params) == model_signature((n, list(s)) for n, s in params)  # type: ignore[misc]
    assert model_signature(params) != model_signature([*params[:2], ("head.weight", (5, 16))])
    assert model_signature(params) != model_signature([*params[:2], ("head.w", (4, 16))])
    assert model_signature(params) != model_signature(params[:2])


# --------------------------------------------------------------------------- directory cache
def test_directory_cache_round_trip(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path / "cache")
    assert cache.load(KEY) is None  # absent directory: a miss
    path = cache.store(KEY, PAYLOAD)
    assert path == tmp_path / "cache" / f"perseus-{KEY.digest()}.json" == cache.path_for(KEY)
    assert cache.load(KEY) == PAYLOAD
    assert cache.load(other(microbatches=4)) is None  # another key: another file
    doc = json.loads(path.read_text())
    assert doc == {"format": "perseus-cache", "version": 1, "key": KEY.to_dict(), "payload": PAYLOAD}


def test_directory_cache_keeps_one_file_per_key(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    cache.store(KEY, {"n": 1})
    cache.store(other(layout="pp4-dp1"), {"n": 2})
    cache.store(KEY, {"n": 3})  # overwrite
    assert cache.load(KEY) == {"n": 3} and cache.load(other(layout="pp4-dp1")) == {"n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"perseus-{KEY.digest()}.json", f"perseus-{other(layout='pp4-dp1').digest()}.json"]
    )  # no temporary files left behind


def test_home_expands(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert PlanCache("~/c").path_for(KEY).parent == tmp_path / "c"


def test_failed_write_keeps_the_old_entry_and_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = PlanCache(tmp_path)
    cache.store(KEY, PAYLOAD)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        cache.store(KEY, {"new": True})
    monkeypatch.undo()
    assert cache.load(KEY) == PAYLOAD
    assert [p.name for p in tmp_path.iterdir()] == [f"perseus-{KEY.digest()}.json"]


def test_unserialisable_payload_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        PlanCache(tmp_path / "c").store(KEY, {"bad": object()})
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- explicit file
def test_explicit_file_round_trip(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "my-plan.json"
    cache = PlanCache(target)
    assert cache.path_for(KEY) == cache.path_for(other(microbatches=2)) == target
    assert cache.load(KEY) is None
    assert cache.store(KEY, PAYLOAD) == target
    assert cache.load(KEY) == PAYLOAD


def test_explicit_file_for_another_key_names_fields_file_and_fix(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    PlanCache(target).store(KEY, PAYLOAD)
    with pytest.raises(CacheMismatchError) as info:
        PlanCache(target).load(other(gpu_name="NVIDIA H100 80GB HBM3", microbatches=16))
    message = str(info.value)
    assert message == (
        f"{target}: cached for another job (gpu_name: cached 'NVIDIA A100-SXM4-40GB', now 'NVIDIA H100 80GB HBM3'; "
        f"microbatches: cached 8, now 16). Fix: delete {target} so that this run profiles again, "
        f"or point cache_dir to another path."
    )
    assert isinstance(info.value, PerseusInputError)


def test_key_with_missing_fields_is_a_mismatch(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    target.write_text(json.dumps({"format": "perseus-cache", "version": 1, "key": {"gpu_name": KEY.gpu_name}, "payload": {}}))
    with pytest.raises(CacheMismatchError, match=re.escape("(model_signature: cached absent, now 'abc123'; schedule:")):
        PlanCache(target).load(KEY)


# --------------------------------------------------------------------------- bad files
def test_corrupt_json_names_file_and_fix(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    cache.path_for(KEY).write_text('{"format": "perseus-cache", ')
    with pytest.raises(PerseusInputError) as info:
        cache.load(KEY)
    assert str(info.value).startswith(f"{cache.path_for(KEY)}: not valid JSON (")
    assert str(info.value).endswith(f"Fix: delete {cache.path_for(KEY)} so that this run profiles again.")


@pytest.mark.parametrize("doc", [[1, 2], {"format": "other", "version": 1, "key": {}, "payload": {}},
                                 {"format": "perseus-cache", "version": 1, "key": {}}])
def test_not_a_cache_file(tmp_path: Path, doc: object) -> None:
    target = tmp_path / "x.json"
    target.write_text(json.dumps(doc))
    with pytest.raises(PerseusInputError, match=re.escape(f"{target}: not a perseus cache file. Fix: delete {target}")):
        PlanCache(target).load(KEY)


def test_other_cache_version(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    target.write_text(json.dumps({"format": "perseus-cache", "version": 99, "key": KEY.to_dict(), "payload": {}}))
    with pytest.raises(PerseusInputError, match=re.escape(f"{target}: cache version 99, this release reads 1. Fix: delete")):
        PlanCache(target).load(KEY)
