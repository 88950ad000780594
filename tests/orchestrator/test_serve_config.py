"""``serve``'s options come from ServeConfig and the configs it nests: every default is
the dataclass field's, defined once, and every field is an option."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from orchestrator.contracts import Topology

from orchestrator.core.config import EngineConfig
from orchestrator.core.scheduler import SchedulerConfig
from orchestrator.kunserve.load_monitor import MonitorConfig
from orchestrator.policy.migration import MigrationConfig
from orchestrator.serve import ServeConfig, add_serve_args, config_from_args
from orchestrator.triton.server import TritonConfig

SECTIONS = [(ServeConfig, ""), (TritonConfig, "triton-"), (MonitorConfig, "monitor-"), (MigrationConfig, "migration-")]
NESTED = {"triton", "monitor", "migration"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return p


def parse(*argv: str) -> ServeConfig:
    return config_from_args(parser().parse_args(["--engine-dir", "x", *argv]))


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def test_every_field_is_an_option_whose_default_is_the_fields():
    p = parser()
    options = {a.dest: a for a in p._actions}
    for cls, prefix in SECTIONS:
        for f in dataclasses.fields(cls):
            if cls is ServeConfig and f.name in NESTED:
                continue
            dest = (prefix + f.name).replace("-", "_")
            assert dest in options, f"{cls.__name__}.{f.name} has no option"
            if f.name == "engine_dir":
                assert options[dest].required
                continue
            got = options[dest].default
            if isinstance(options[dest], argparse._AppendAction):
                assert got is None and _default(f) == (), dest  # repeated: no values means the empty tuple
            else:
                assert got == _default(f), (dest, got, _default(f))
    fields = {(prefix + f.name).replace("-", "_") for cls, prefix in SECTIONS for f in dataclasses.fields(cls)}
    unknown = [a.dest for a in p._actions if a.dest not in fields | {"help", "triton"}]
    assert not unknown, f"options that map to no config field: {unknown}"


def test_the_parsers_defaults_make_the_dataclasses_defaults():
    assert parse() == ServeConfig(engine_dir=Path("x"))
    assert parse("--triton").triton == TritonConfig()


def test_shared_defaults_come_from_the_core():
    cfg = ServeConfig(engine_dir=Path("x"))
    sched, engine = SchedulerConfig(), EngineConfig(engine_dir=Path("x"))
    assert (cfg.max_num_batched_tokens, cfg.max_num_seqs, cfg.swap_space) == \
        (sched.max_num_batched_tokens, sched.max_num_seqs, sched.swap_space_bytes)
    assert (engine.max_num_batched_tokens, engine.max_num_seqs, engine.page_size) == \
        (sched.max_num_batched_tokens, sched.max_num_seqs, cfg.page_size)


def test_nested_settings_reach_their_configs():
    cfg = parse("--policy", "kunserve", "--monitor-window", "12", "--monitor-restore-patience", "4",
                "--triton", "--triton-arg=--log-info=true", "--triton-arg=--x=1")
    assert cfg.monitor == MonitorConfig(window=12, restore_patience=4)
    assert cfg.triton.extra_args == ("--log-info=true", "--x=1")
    assert parse("--policy", "llumnix", "--migration-cooldown-s", "2").migration == MigrationConfig(cooldown_s=2.0)
    assert parse("--policy", "swap", "--swap-space", "1GiB").swap_space == 1 << 30


@pytest.mark.parametrize("argv,words", [
    (["--policy", "kunserve", "--monitor-restore-level", "0.99"], "restore_level < overload_level"),
    (["--policy", "llumnix", "--migration-target-usage", "0.95"], "target_usage < source_usage"),
    (["--monitor-window", "12"], "--policy vllm has none"),
    (["--policy", "kunserve", "--migration-cooldown-s", "2"], "--policy kunserve never migrates"),
    (["--swap-space", "1GiB"], "--policy vllm does not swap"),
    (["--triton-grpc-port", "9001"], r"\(grpc_port\) were given without --triton"),
])
def test_bad_nested_settings_are_refused_with_the_reason(argv, words):
    with pytest.raises(ValueError, match=words):
        parse(*argv)


@pytest.mark.parametrize("policy", ["kunserve", "vllm", "swap", "oracle", "llumnix"])
def test_prefix_caching_is_on_by_default_for_every_policy(policy):
    assert parse("--policy", policy).enable_prefix_caching
    assert not parse("--policy", policy, "--no-enable-prefix-caching").enable_prefix_caching


@pytest.mark.parametrize("argv,words", [
    (["--tp", "2", "--policy", "swap"], "--tp 2: --policy swap swaps or migrates KV of one rank per instance"),
    (["--tp", "2", "--policy", "llumnix"], "--tp 2: --policy llumnix swaps or migrates"),
    (["--tp", "0"], "--tp must be >= 1"),
])
def test_tensor_parallel_serving_refuses_the_policies_of_one_rank_instances(argv, words):
    with pytest.raises(ValueError, match=words):
        parse(*argv)
    for policy in ("vllm", "oracle", "kunserve"):
        assert parse("--tp", "2", "--policy", policy).tp == 2


@pytest.mark.parametrize("text,world,tp,want", [
    ("0-3,4-7", 8, 2, "0-1,2-3"), ("0-3", 8, 2, "0-1,2,3"), ("0-1", 4, 2, "0,1"), (None, 8, 2, "0,1,2,3"),
    ("0-5", 6, 3, "0-1"), ("0-1", 4, 1, "0-1,2,3")])
def test_groups_with_tp_name_world_ranks_and_become_groups_of_tp_sets(text, world, tp, want):
    assert str(Topology.parse(text, world, tp)) == want


@pytest.mark.parametrize("text", ["1-4", "0-2", "3"])
def test_a_group_that_splits_a_tp_set_is_refused(text):
    with pytest.raises(ValueError, match=r"with --tp 2 an instance is whole TP sets .* splits one"):
        Topology.parse(text, 8, 2)
