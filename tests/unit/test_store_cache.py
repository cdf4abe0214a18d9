"""The Store's read cache never disagrees with LevelDB: random writes (small
values, values too big to keep, deletes), reads and snapshot installs on a
real LevelDB, every read checked against a dict, with a cache small enough
to start over now and then."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftkv.statemachine.layout import APPLIED_KEY, encode_index
from raftkv.storage import leveldb
from raftkv.storage.leveldb import Store

pytestmark = pytest.mark.timeout(120)

KEYS = [b"k%d" % i for i in range(10)]
VALUES = st.one_of(st.none(), st.binary(max_size=8),
                   st.binary(min_size=leveldb.READ_CACHE_VALUE_BYTES_MAX + 1,
                             max_size=leveldb.READ_CACHE_VALUE_BYTES_MAX + 8))
STEPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4)),
    st.tuples(st.just("get"), st.sampled_from(KEYS)),
    st.tuples(st.just("get"), st.sampled_from(KEYS)),
    st.tuples(st.just("install"), st.dictionaries(st.sampled_from(KEYS), st.binary(max_size=8),
                                                  max_size=4)),
), max_size=60)


@settings(max_examples=200, deadline=None)
@given(steps=STEPS)
def test_reads_match_a_dict_through_writes_and_installs(steps: list[tuple[str, object]]) -> None:
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as tmp:
        patch.setattr(leveldb, "READ_CACHE_BYTES_MAX", 8 * 110)
        store = Store(Path(tmp) / "state")
        model: dict[bytes, bytes] = {}
        index = 0
        try:
            for kind, arg in steps:
                if kind == "write":
                    assert isinstance(arg, dict)
                    index += 1
                    store.write({**arg, APPLIED_KEY: encode_index(index)})
                    for key, value in arg.items():
                        if value is None:
                            model.pop(key, None)
                        else:
                            model[key] = value
                elif kind == "install":
                    assert isinstance(arg, dict)
                    store.replace_from(iter(sorted(arg.items())))
                    model = dict(arg)
                else:
                    assert isinstance(arg, bytes)
                    assert store.get(arg) == model.get(arg)
            for key in KEYS:
                assert store.get(key) == model.get(key), key
        finally:
            store.close()


def test_a_small_value_read_once_is_served_from_memory_until_written(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    try:
        store.write({b"a": b"1", APPLIED_KEY: encode_index(1)})
        assert store.get(b"a") == b"1"
        store._db.put(b"a", b"behind the cache's back")  # (only to observe the cache)
        assert store.get(b"a") == b"1"
        store.write({b"a": b"2", APPLIED_KEY: encode_index(2)})
        assert store.get(b"a") == b"2"
    finally:
        store.close()


def test_the_cache_stays_within_its_byte_budget(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    try:
        value = b"v" * leveldb.READ_CACHE_VALUE_BYTES_MAX
        store.write({**{b"k%06d" % i: value for i in range(5000)}, APPLIED_KEY: encode_index(1)})
        for i in range(5000):
            assert store.get(b"k%06d" % i) == value
            store.write({b"k%06d" % i: value[:1 + i % 100], APPLIED_KEY: encode_index(2 + i)})
            assert store._cache_bytes == sum(leveldb._cached_size(k, v)
                                             for k, v in store._cache.items())
            assert store._cache_bytes <= leveldb.READ_CACHE_BYTES_MAX
    finally:
        store.close()
