"""A soak of the supervised cluster: mixed traffic, drops and restores, ranks killed.

    python -m perf.soak --engine-dir stores/smollm2 --ranks 4 --minutes 5 --kill-every 60 \\
        --triton --out runs/soak

For ``--minutes``, ``--clients`` loops send, each request drawn at random: completions
streamed and not, chat streamed and not, a stream its client cancels after a few chunks,
a client that vanishes (closes its connection) mid-stream, a bad request (which must get
a 4xx), and with ``--triton`` gRPC streams through Triton. Completions are greedy with
``ignore_eos`` and checked token for token against the single-process engine
(``python -m orchestrator generate``). Meanwhile drops and restores are forced through
the admin API every ``--reshape-every`` seconds (and the kunserve policy drops on its
own under load), and with ``--kill-every`` a random rank is SIGKILLed that often. After
the traffic stops, every rank's pages must be free (the page audit).

It reports requests sent, completed, failed with their reasons, token mismatches, the
faults and restarts, the reshapes, each rank's resident memory over time
(``summary.json``, ``summary.md`` and ``memory.csv`` under ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from perf.cluster_client import SupervisedCluster, reference_completions, sse_chunks

PROMPTS = [f"Soak request {i}: " + "tell me about the weather and the sea " * (4 + 4 * (i % 4)) for i in range(12)]
MAX_TOKENS = [48 + 24 * (i % 5) for i in range(12)]
KINDS = ("stream", "unary", "chat_stream", "chat", "cancel", "vanish", "bad")


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)
    completed: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    """(kind, reason) -> count."""
    mismatches: list = field(default_factory=list)
    kills: list = field(default_factory=list)
    reshapes: Counter = field(default_factory=Counter)
    memory: list = field(default_factory=list)
    """(seconds, rank, resident bytes, KV pages used)."""

    def fail(self, kind: str, reason: str) -> None:
        self.failed[(kind, reason[:160])] += 1


class Soak:
    def __init__(self, cluster: SupervisedCluster, refs: list[list[int]], triton_refs: list[list[int]] | None,
                 args: argparse.Namespace) -> None:
        self.c = cluster
        self.refs = refs
        self.triton_refs = triton_refs
        self.args = args
        self.t = Tally()
        self.rng = random.Random(args.seed)
        self.t0 = time.monotonic()
        self.stop_at = self.t0 + args.minutes * 60

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run(self) -> Tally:
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            tasks = [asyncio.create_task(self._client(s, i)) for i in range(self.args.clients)]
            tasks += [asyncio.create_task(self._reshaper(s)), asyncio.create_task(self._sampler(s))]
            if self.triton_refs is not None:
                tasks.append(asyncio.create_task(self._triton_client()))
            if self.args.kill_every:
                tasks.append(asyncio.create_task(self._killer()))
            await asyncio.gather(*tasks)
        return self.t

    # Traffic ---------------------------------------------------------------------------------
    async def _client(self, s: aiohttp.ClientSession, n: int) -> None:
        while time.monotonic() < self.stop_at:
            kind = self.rng.choice(KINDS)
            i = self.rng.randrange(len(PROMPTS))
            self.t.sent[kind] += 1
            try:
                await getattr(self, f"_{kind}")(s, i)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                self.t.fail(kind, f"{type(exc).__name__}: {exc}")

    def _body(self, i: int, stream: bool) -> dict:
        return {"prompt": PROMPTS[i], "max_tokens": MAX_TOKENS[i], "temperature": 0, "ignore_eos": True,
                "stream": stream}

    async def _sse(self, resp, kind: str, limit: int | None = None) -> tuple[list[int], bool]:
        """Token ids of a stream (up to ``limit`` chunks); False when it ended in an error."""
        tokens: list[int] = []
        chunks = 0
        async for chunk in sse_chunks(resp):
            if "error" in chunk:
                self.t.fail(kind, chunk["error"].get("message", str(chunk["error"])))
                return tokens, False
            tokens += chunk["choices"][0].get("token_ids", []) if chunk.get("choices") else []
            chunks += 1
            if limit is not None and chunks >= limit:
                break
        return tokens, True

    def _check(self, kind: str, i: int, tokens: list[int], want: list[int]) -> None:
        if tokens == want:
            self.t.completed[kind] += 1
        else:
            self.t.mismatches.append({"kind": kind, "prompt": i, "at_s": round(self.now(), 1),
                                      "got": len(tokens), "want": len(want),
                                      "first_diff": next((k for k, (x, y) in enumerate(zip(tokens, want)) if x != y),
                                                         min(len(tokens), len(want)))})

    async def _stream(self, s, i: int) -> None:
        async with s.post(self.c.url + "/v1/completions", json=self._body(i, True)) as r:
            if r.status != 200:
                return self.t.fail("stream", f"HTTP {r.status}: {(await r.text())[:120]}")
            tokens, ok = await self._sse(r, "stream")
        if ok:
            self._check("stream", i, tokens, self.refs[i])

    async def _unary(self, s, i: int) -> None:
        async with s.post(self.c.url + "/v1/completions", json=self._body(i, False)) as r:
            data = await r.json()
        if r.status != 200:
            return self.t.fail("unary", f"HTTP {r.status}: {data.get('error', {}).get('message', '')[:120]}")
        self._check("unary", i, data["choices"][0]["token_ids"], self.refs[i])

    def _chat_body(self, i: int, stream: bool) -> dict:
        return {"messages": [{"role": "user", "content": PROMPTS[i]}], "max_tokens": MAX_TOKENS[i],
                "temperature": 0, "stream": stream}

    async def _chat_stream(self, s, i: int) -> None:
        async with s.post(self.c.url + "/v1/chat/completions", json=self._chat_body(i, True)) as r:
            if r.status != 200:
                return self.t.fail("chat_stream", f"HTTP {r.status}")
            _tokens, ok = await self._sse(r, "chat_stream")
        if ok:
            self.t.completed["chat_stream"] += 1

    async def _chat(self, s, i: int) -> None:
        async with s.post(self.c.url + "/v1/chat/completions", json=self._chat_body(i, False)) as r:
            data = await r.json()
        if r.status != 200 or not data["choices"][0]["message"]["content"]:
            return self.t.fail("chat", f"HTTP {r.status}: {str(data)[:120]}")
        self.t.completed["chat"] += 1

    async def _cancel(self, s, i: int) -> None:
        """A client that reads a few chunks, then closes the stream (the request is aborted)."""
        async with s.post(self.c.url + "/v1/completions", json=self._body(i, True)) as r:
            if r.status != 200:
                return self.t.fail("cancel", f"HTTP {r.status}")
            await self._sse(r, "cancel", limit=self.rng.randint(1, 4))
        self.t.completed["cancel"] += 1

    async def _vanish(self, s, i: int) -> None:
        """A client that goes away mid-stream without a word: its own connection, dropped."""
        async with aiohttp.ClientSession() as own:
            resp = await own.post(self.c.url + "/v1/completions", json=self._body(i, True))
            try:
                if resp.status != 200:
                    return self.t.fail("vanish", f"HTTP {resp.status}")
                await resp.content.readany()
                resp.connection.transport.abort()  # no FIN handshake: the socket just dies
            finally:
                resp.close()
        self.t.completed["vanish"] += 1

    async def _bad(self, s, i: int) -> None:
        body = self.rng.choice([{"prompt": PROMPTS[i], "max_tokens": -1}, {"prompt": ""}, {"max_tokens": 3},
                                {"prompt": PROMPTS[i], "temperature": "hot"}])
        async with s.post(self.c.url + "/v1/completions", json=body) as r:
            await r.read()
        if 400 <= r.status < 500:
            self.t.completed["bad"] += 1
        else:
            self.t.fail("bad", f"a bad request got HTTP {r.status}")

    async def _triton_client(self) -> None:
        from perf.triton_client import GenerateRequest, stream_generate

        n = 0
        while time.monotonic() < self.stop_at:
            # Streamed and not (one response), and a bad one (max_tokens 0) that must be refused.
            batch = [GenerateRequest(f"t{n}-{k}", PROMPTS[k], MAX_TOKENS[k], stream=k % 2 == 0) for k in range(4)]
            bad = GenerateRequest(f"t{n}-bad", PROMPTS[0], 0)
            n += 1
            for req in batch:
                self.t.sent["triton_stream" if req.stream else "triton_unary"] += 1
            self.t.sent["triton_bad"] += 1
            results = await stream_generate(self.c.grpc_target, "kunserve", batch + [bad], timeout_s=300)
            for k, req in enumerate(batch):
                kind = "triton_stream" if req.stream else "triton_unary"
                res = results[req.request_id]
                if res.error is not None:
                    self.t.fail(kind, res.error)
                else:
                    self._check(kind, k, res.token_ids, self.triton_refs[k])
            if results[bad.request_id].error is not None and "max_tokens" in results[bad.request_id].error:
                self.t.completed["triton_bad"] += 1
            else:
                self.t.fail("triton_bad", f"a bad request got {results[bad.request_id].error!r}")

    # Reshapes, faults, memory ---------------------------------------------------------------------
    async def _reshaper(self, s) -> None:
        groups = [[r, r + 1] for r in range(0, self.args.ranks - 1, 2)]
        if not self.args.reshape_every:
            return
        while time.monotonic() + self.args.reshape_every < self.stop_at:
            await asyncio.sleep(self.args.reshape_every)  # the soak's schedule, not a stand-in for work
            group = self.rng.choice(groups)
            for path, body in (("/admin/drop", {"group": group}), ("/admin/restore", {"group": group})):
                try:
                    async with s.post(self.c.url + path, json=body) as r:
                        await r.read()
                    self.t.reshapes[f"{path.split('/')[-1]} {r.status}"] += 1
                except aiohttp.ClientError as exc:
                    self.t.reshapes[f"{path.split('/')[-1]} {type(exc).__name__}"] += 1
                await asyncio.sleep(self.args.reshape_every / 2)

    async def _killer(self) -> None:
        while True:
            wait = self.rng.uniform(0.5, 1.5) * self.args.kill_every  # random intervals, this mean
            if time.monotonic() + wait >= self.stop_at:
                return
            await asyncio.sleep(wait)  # the fault schedule
            pids = self.c.rank_pids()
            if not pids:
                continue
            rank = self.rng.randrange(len(pids))
            os.kill(pids[rank], signal.SIGKILL)
            self.t.kills.append({"at_s": round(self.now(), 1), "rank": rank})

    async def _sampler(self, s) -> None:
        while time.monotonic() < self.stop_at:
            try:
                async with s.get(self.c.url + "/admin/state") as r:
                    if r.status == 200:
                        for rank in (await r.json())["ranks"]:
                            self.t.memory.append((round(self.now(), 1), rank["rank"], rank["resident_bytes"],
                                                  rank["kv_pages_used"]))
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(2.0)  # the sampling period


def _audit(c: SupervisedCluster) -> dict:
    c.wait_health(200, 300)
    state = c.wait_all_free(timeout=30)
    used = {r["rank"]: r["kv_pages_used"] for r in state["ranks"]}
    busy = [i["instance"] for i in state["instances"] if i["waiting"] or i["running"]]
    return {"pages_used": used, "busy_instances": busy, "clean": not any(used.values()) and not busy}


def _memory_summary(memory: list) -> dict:
    out = {}
    for rank in sorted({m[1] for m in memory}):
        rss = [m[2] for m in memory if m[1] == rank]
        out[rank] = {"first_mib": rss[0] / 2**20, "last_mib": rss[-1] / 2**20, "max_mib": max(rss) / 2**20,
                     "median_mib": statistics.median(rss) / 2**20}
    return out


def _markdown(summary: dict) -> str:
    lines = [f"# Soak: {summary['minutes']} min, {summary['ranks']} ranks, kill every "
             f"{summary['kill_every_s'] or 'never'} s", "",
             f"- requests sent {summary['sent_total']}, completed {summary['completed_total']}, "
             f"failed {summary['failed_total']}, token mismatches {len(summary['mismatches'])}",
             f"- kills {len(summary['kills'])}, job restarts {summary['restarts']}, "
             f"requests resumed on a new job {summary['resumed']}",
             f"- forced reshapes (admin API, status): {summary['reshapes']}; the kunserve policy's own decisions: "
             f"{summary['automatic']}",
             f"- page audit after the traffic: {'clean' if summary['audit']['clean'] else summary['audit']}", "",
             "| kind | sent | completed |", "|:---|---:|---:|"]
    lines += [f"| {k} | {summary['sent'][k]} | {summary['completed'].get(k, 0)} |" for k in sorted(summary["sent"])]
    if summary["failed"]:
        lines += ["", "| failed: kind | reason | count |", "|:---|:---|---:|"]
        lines += [f"| {f['kind']} | {f['reason']} | {f['count']} |" for f in summary["failed"]]
    lines += ["", "| rank | resident MiB first | last | max |", "|---:|---:|---:|---:|"]
    lines += [f"| {r} | {m['first_mib']:.0f} | {m['last_mib']:.0f} | {m['max_mib']:.0f} |"
              for r, m in summary["memory"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", type=Path, required=True)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--kill-every", type=float, default=0.0, help="seconds between rank kills (0: none)")
    p.add_argument("--reshape-every", type=float, default=8.0, help="seconds between forced drop/restore cycles (0: none)")
    p.add_argument("--device-memory", default="566MiB",
                   help="per rank; the default leaves the demo model a small KV pool, so that the traffic "
                        "overloads it and the kunserve policy drops on its own")
    p.add_argument("--overload-level", type=float, default=0.8,
                   help="the kunserve policy's --monitor-overload-level for the soak's cluster")
    p.add_argument("--triton", action="store_true", help="also send gRPC streams through Triton")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    refs = reference_completions(args.engine_dir, PROMPTS, MAX_TOKENS)
    triton_refs = reference_completions(args.engine_dir, PROMPTS[:4], MAX_TOKENS[:4], ignore_eos=False) \
        if args.triton else None
    # The kunserve policy, voting overload at 80% of demand over capacity (95% by default),
    # so that this traffic on the small pool makes it drop on its own, not only when told.
    serve = ("--policy", "kunserve", "--monitor-overload-level", str(args.overload_level))
    sup = ("--heartbeat-timeout-s", "10")
    if args.triton:
        from perf.triton_client import SupervisedTritonCluster
        cluster = SupervisedTritonCluster(args.ranks, args.engine_dir, *serve, device_memory=args.device_memory,
                                          supervise_args=sup, model_names="kunserve")
    else:
        cluster = SupervisedCluster(args.ranks, args.engine_dir, *serve, device_memory=args.device_memory,
                                    supervise_args=sup)
    with cluster as c:
        tally = asyncio.run(Soak(c, refs, triton_refs, args).run())
        audit = _audit(c)
        log = c.output()
    failed = [{"kind": k, "reason": r, "count": n} for (k, r), n in tally.failed.most_common()]
    summary = {"minutes": args.minutes, "ranks": args.ranks, "kill_every_s": args.kill_every,
               "sent": dict(tally.sent), "completed": dict(tally.completed), "failed": failed,
               "sent_total": sum(tally.sent.values()), "completed_total": sum(tally.completed.values()),
               "failed_total": sum(tally.failed.values()), "mismatches": tally.mismatches, "kills": tally.kills,
               "restarts": log.count("restarting it"), "resumed": log.count("resuming "),
               "automatic": {a: len(re.findall(rf"'event': 'decision'.*'action': '{a}'", log))
                             for a in ("drop", "restore")},
               "reshapes": dict(tally.reshapes), "audit": audit, "memory": _memory_summary(tally.memory)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "summary.md").write_text(_markdown(summary))
    (args.out / "memory.csv").write_text("seconds,rank,resident_bytes,kv_pages_used\n" +
                                         "".join(f"{t},{r},{b},{p}\n" for t, r, b, p in tally.memory))
    (args.out / "cluster.log").write_text(log)
    print(_markdown(summary))
    return 0 if not failed and not tally.mismatches and audit["clean"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
