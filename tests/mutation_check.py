"""Mutation check: each deliberate break of the mechanism must make a test fail.

    python -m tests.mutation_check                    # every mutation, a table at the end
    python -m tests.mutation_check --only exchange-disabled,page-leaked
    python -m tests.mutation_check --tests-from 869f087   # the tests of an older commit

For each mutation the working tree (tracked and untracked files, uncommitted changes
included) is copied to a temporary directory, the break is applied there as a text patch
(each ``old`` must occur exactly once, so a patch that no longer applies is an error, not
a pass), and the tests that guard that part of the mechanism run on the copy. A mutation
is *caught* when pytest reports failures (exit status 1). Exit status 0 is *missed*; any
other status (a collection error, say) is an *error*, so a broken patch cannot pass as
caught. ``--tests-from REV`` takes ``tests/`` from a git revision instead, to show which
breaks an older suite let through. The script exits non-zero unless every mutation is
caught. It is not part of the suite (it runs the suite's slowest tests once per mutation,
about a minute each): run it after changing the mechanism or its tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DROP = "tests/orchestrator/cluster/test_drop_restore.py"
CYCLES = DROP + "::test_tokens_identical_across_drop_restore_cycles"
PREFILL = DROP + "::test_requests_in_prefill_at_the_drop_continue_identically"
E2E = "tests/orchestrator/cluster/test_cluster_e2e.py::test_greedy_outputs_match_single_process_engine"
SHARED = "tests/orchestrator/cluster/test_shared_blocks_reshape.py"
SERVED = "tests/orchestrator/cluster/test_prefix_caching_served.py::test_cached_prefixes_are_hit_across_a_drop_and_a_restore"


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str
    patches: tuple[tuple[str, str], ...]
    """(old, new) text replacements in ``file``; each ``old`` occurs exactly once."""
    tests: tuple[str, ...]
    """pytest node ids that must catch it."""


MUTATIONS = [
    Mutation("exchange-disabled", "every stale request recomputed instead of exchanging its KV (silently)",
             "orchestrator/cluster/formation.py",
             (("                req_moves = self._plan_request(s, self.driver.blocks)\n",
               "                self._recompute(s, [])  # MUTATION\n                continue\n"),),
             (CYCLES + "[2-group0-False-commit]", PREFILL)),
    Mutation("restore-moves-skipped", "the restore recomputes every request instead of moving its KV home (silently)",
             "orchestrator/cluster/split.py",
             (("        candidates = [] if self.ctx.faults.restore_no_room else parts\n",
               "        candidates = []  # MUTATION\n"),
              ("""        logger.warning("restore: no part can hold %s's KV; it will be recomputed", req.request_id)\n""",
               "")),
             (CYCLES + "[2-group0-False-commit]",)),
    Mutation("received-kv-dropped", "exchanged pages land in a throw-away copy of the pool, not in it",
             "orchestrator/cluster/kv_mover.py",
             (("handles.append(self.transport.irecv_rows(data, dst, src_rank, TAG_KV))",
               "handles.append(self.transport.irecv_rows(data.clone(), dst, src_rank, TAG_KV))  # MUTATION"),),
             (CYCLES + "[2-group0-False-commit]",)),
    Mutation("cost-model-ignored", "--cost-model accepted, but micro-batches formed without lookahead",
             "orchestrator/cluster/instance.py",
             (("        if self.cost_model is not None and len(self.ranks) > 1:\n            return self._step_lookahead()",
               "        if False:  # MUTATION\n            return self._step_lookahead()"),),
             (CYCLES + "[2-group2-True-commit]",)),
    Mutation("remap-ignored", "--kv-extension remap accepted, but the pool grows by committing pages",
             "orchestrator/launch.py",
             (("                        kv_extension=cfg.kv_extension, tp=tp,",
               "                        kv_extension=\"commit\", tp=tp,  # MUTATION"),),
             (CYCLES + "[4-group3-False-remap]",)),
    Mutation("page-leaked", "a finished request's first page of its own in every layer is never freed",
             "orchestrator/core/block_manager.py",
             (("                    alloc.free(req.block_table[layer][shared:])",
               "                    alloc.free(req.block_table[layer][shared + 1:])  # MUTATION"),),
             (E2E + "[2-None]", "tests/orchestrator/core/test_scheduler.py")),
    Mutation("token-dropped-in-stream", "the ingress drops the first token of each request's last event",
             "orchestrator/ingress/answer.py",
             (("        event = await self.queue.get()\n",
               "        event = await self.queue.get()\n"
               "        if event.finished:  # MUTATION\n            event.token_ids = event.token_ids[1:]\n"),),
             (E2E + "[2-None]",)),
    Mutation("channels-shared", "the tagless transport puts every traffic class on one channel",
             "orchestrator/transport/nccl.py",
             (("            return self._channels[tag]\n",
               "            return self._channels[min(self._channels)]  # MUTATION\n"),),
             ("tests/orchestrator/transport/test_transport.py::test_gloo_two_ranks_fifo_rows_classes_and_unknown_tags",
              DROP + "::test_tokens_identical_across_drop_restore_cycles_over[gloo]")),
    Mutation("decode-mask-float32", "the decode mask stays float32 under bf16 or fp16 queries",
             "engines/step_meta.py",
             (("    decode_mask = torch.zeros(valid.shape, dtype=dtype, device=device)",
               "    decode_mask = torch.zeros(valid.shape, device=device)"),),  # the line goes on: no comment
             ("tests/engines/test_attention_dtypes.py",)),
    Mutation("logprobs-lost-in-export", "a request handed to another leader leaves its unreported log-probabilities behind",
             "orchestrator/cluster/instance.py",
             (("                               req.num_migrations + migrated, logprobs=req.logprobs, prefix_hashes=shared,",
               "                               req.num_migrations + migrated, prefix_hashes=shared,  # MUTATION"),),
             ("tests/orchestrator/cluster/test_logprobs_across_drop.py",)),
    Mutation("shared-page-freed", "a request's cached (shared) pages go back to the free list when it ends",
             "orchestrator/core/block_manager.py",
             (("                    alloc.free(req.block_table[layer][shared:])",
               "                    alloc.free(req.block_table[layer])  # MUTATION"),),
             ("tests/orchestrator/core/test_prefix_cache.py", "tests/orchestrator/core/test_prefix_caching_engine.py")),
    Mutation("shared-block-moved-per-request", "a drop's exchange moves the shared blocks' pages with every request that shares them",
             "orchestrator/cluster/formation.py",
             (("                pages = blocks.own_pages(s.req, layer)  # the shared blocks move once, on their own",
               "                pages = s.req.block_table[layer]  # MUTATION"),),
             (SHARED, SERVED)),
    Mutation("tp-all-reduce-skipped", "tensor-parallel ranks keep their partial sums instead of adding them up",
             "engines/tensor_parallel.py",
             (("            t.copy_(total)", "            pass  # MUTATION"),),
             ("tests/engines/test_tensor_parallel.py",)),
    Mutation("restore-copies-per-request", "a restore copies a shared block once per request instead of once per part",
             "orchestrator/cluster/split.py",
             (("                if (b.hash, p) not in self.copies:",
               "                if True:  # MUTATION"),),
             (SHARED,)),
    Mutation("tp-follower-kv-not-moved", "a TP follower leaves its heads' KV where it was in an exchange",
             "orchestrator/cluster/tp_set.py",
             (("                mover.post_all()", "                mover.finish(order.batch)  # MUTATION"),),
             ("tests/orchestrator/cluster/test_tp_drop_restore.py",)),
    Mutation("tp-follower-keeps-weights", "a TP follower keeps every layer when its leader drops",
             "orchestrator/cluster/tp_set.py",
             (("                engine.drop_to(order.layers)\n", "                pass  # MUTATION\n"),),
             ("tests/orchestrator/cluster/test_tp_drop_restore.py",)),
]


def copy_tree(dst: Path, tests_from: str | None) -> None:
    """The working tree's files (tracked and untracked, not ignored) into ``dst``."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    if tests_from:
        shutil.rmtree(dst / "tests")
        archive = subprocess.run(["git", "archive", tests_from, "tests"], cwd=REPO, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive.stdout, check=True)


def apply(root: Path, m: Mutation) -> None:
    path = root / m.file
    text = path.read_text()
    for old, new in m.patches:
        n = text.count(old)
        if n != 1:
            raise SystemExit(f"{m.name}: the patch's text occurs {n} times in {m.file} (expected once); "
                             "update the mutation to the code")
        text = text.replace(old, new)
    path.write_text(text)


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    t0 = time.monotonic()
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                             env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return -1, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}", time.monotonic() - t0
    return res.returncode, res.stdout + res.stderr, time.monotonic() - t0


def failed_tests(output: str) -> list[str]:
    return [line.split(" ", 1)[1].split(" - ")[0] for line in output.splitlines()
            if line.startswith(("FAILED ", "ERROR "))]


def check(m: Mutation, tests_from: str | None, timeout: float) -> tuple[str, list[str], float]:
    with tempfile.TemporaryDirectory(prefix=f"mutation-{m.name}-") as tmp:
        root = Path(tmp)
        copy_tree(root, tests_from)
        if m.name != "none":
            apply(root, m)
        code, output, seconds = run_tests(root, m.tests, timeout)
    verdict = {0: "missed", 1: "caught"}.get(code, f"error (pytest exit {code})")
    if verdict.startswith("error"):
        print(output[-3000:], file=sys.stderr)
    return verdict, failed_tests(output), seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated mutation names (default: all)")
    ap.add_argument("--tests-from", metavar="REV", help="take tests/ from this git revision")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the unmutated run of the same tests (it shows they pass as they are)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    args = ap.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {m.name for m in MUTATIONS})
        if unknown:
            ap.error(f"unknown mutations {unknown}; known: {', '.join(m.name for m in MUTATIONS)}")
        chosen = [m for m in MUTATIONS if m.name in names]
    rows = []
    if not args.no_baseline:
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        verdict, failed, seconds = check(Mutation("none", "no mutation", "", (), tests), args.tests_from, args.timeout)
        if verdict != "missed":  # "missed" is a pass here: the unmutated tree passes its tests
            print(f"the unmutated tree fails its tests ({verdict}): {failed}", file=sys.stderr)
            return 2
        print(f"baseline: the unmutated tree passes the {len(tests)} test selections ({seconds:.0f} s)", flush=True)
    for m in chosen:
        verdict, failed, seconds = check(m, args.tests_from, args.timeout)
        rows.append((m, verdict, failed, seconds))
        print(f"{m.name}: {verdict} ({seconds:.0f} s)", flush=True)
    print(f"\ntests of {args.tests_from}" if args.tests_from else "\ntests of the working tree")
    print("\n| mutation | break | result | failing tests |")
    print("|:---|:---|:---|:---|")
    for m, verdict, failed, _s in rows:
        names = ", ".join(f.split("::")[-1] for f in failed) or "-"
        print(f"| {m.name} | {m.what} | {verdict} | {names} |")
    return 0 if all(v == "caught" for _m, v, _f, _s in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
