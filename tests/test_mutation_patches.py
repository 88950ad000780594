"""Every break that ``python -m tests.mutation_check`` applies still applies: its text occurs
exactly once in today's file (the check refuses a stale patch, but runs only by hand)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mutation_check import MUTATIONS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_patch_applies_once(mutation):
    text = (ROOT / mutation.file).read_text(encoding="utf-8")
    for old, _ in mutation.patches:
        assert text.count(old) == 1, f"{mutation.name}: {old!r} occurs {text.count(old)} times in {mutation.file}"
    for target in mutation.tests:
        assert (ROOT / target.split("::")[0]).is_file(), f"{mutation.name}: no test file {target}"
