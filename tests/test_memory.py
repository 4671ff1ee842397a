"""The allocator policy (bitsmith/memory.py): thresholds raised by nested contexts come back in order."""
import pytest

from bitsmith import memory


def test_nested_thresholds_come_back_in_order(monkeypatch):
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))

        def malloc_trim(self, pad):
            calls.append(("trim",))

    monkeypatch.setattr(memory, "_libc", lambda: Libc())
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with memory.mmap_threshold(memory.BATCH_THRESHOLD), memory.keeping_freed_memory():
        pass
    set_to = [c[2] for c in calls if c[0] == "mallopt"]
    assert set_to == [memory.BATCH_THRESHOLD, memory.LOOP_THRESHOLD, memory.BATCH_THRESHOLD, memory.MMAP_THRESHOLD]
    assert calls.count(("trim",)) == 2 and memory._current == []


@pytest.mark.parametrize("env, expected", [(None, memory.MMAP_THRESHOLD), ("4096", 4096)])
def test_outside_the_contexts_the_environment_decides(monkeypatch, env, expected):
    if env is None:
        monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    else:
        monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", env)
    assert memory._base() == expected
