"""The fuzz targets as a short seeded smoke (testsupport/fuzz_targets.py).

Each target replays its seeds and every input kept in
``tests/fuzz_corpus/<target>/`` (crashes fuzzing found, since fixed), then
a fixed number of seeded mutations: deterministic, a second or two per
target. The long runs are ``benchmarks/fuzz.py`` (docs/SECURITY.md).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from testsupport.fuzz_targets import TARGETS, Scratch, corpus, mutate

#: Mutated inputs per target (about a second each here).
SMOKE_INPUTS = {
    "deep": 1500,
    "dirindex": 4000,
    "metadata": 4000,
    "dgzip": 600,
    "control": 1500,
    "proxycrypt": 1500,
}


@pytest.fixture(autouse=True)
def _scratch() -> Iterator[None]:
    yield
    Scratch.clean()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_kept_inputs_and_seeds_are_handled(name: str) -> None:
    target = TARGETS[name]
    for path in corpus(name):
        target.run(path.read_bytes())
    for seed in target.seeds():
        target.run(seed)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeded_mutations_raise_only_declared_errors(name: str) -> None:
    target = TARGETS[name]
    seeds = target.seeds()
    rng = random.Random(f"dgfs-fuzz-{name}")
    for _ in range(SMOKE_INPUTS[name]):
        data = mutate(rng, seeds, target.dictionary)
        try:
            target.run(data)
        except Exception as exc:
            raise AssertionError(f"{name} crashed on {data!r}") from exc


def test_every_target_has_a_smoke_budget() -> None:
    assert set(SMOKE_INPUTS) == set(TARGETS)
