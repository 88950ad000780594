"""perf.traces: loaders on small files, format sniffing, strict errors, transforms, synthesis, prompts."""

from __future__ import annotations

import json
import random
import re
import statistics
import time
from pathlib import Path

import pytest

from perf.traces import (LOADERS, BurstWindow, LengthDist, PromptSynthesizer, Trace, TraceFormatError,
                         TraceRequest, busiest_window, gamma_bursty, load_azure, load_burstgpt,
                         load_mooncake, load_trace, repeat_window, scale_lengths, sniff_format,
                         time_scale, upscale, window)

ROOT = Path(__file__).resolve().parents[2]
# The real traces sit in shared/ beside the checkout (the workspace's own copy as fallback).
SHARED = next((d for d in (ROOT.parent / "shared" / "traces", Path("/work/shared/traces")) if d.is_dir()),
              ROOT.parent / "shared" / "traces")
AZURE_CODE = SHARED / "AzureLLMInferenceTrace_code.csv"
AZURE_CONV = SHARED / "AzureLLMInferenceTrace_conv.csv"

BURSTGPT_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"
BURSTGPT_ROWS = [  # (timestamp, model, request, response)
    (5.0, "ChatGPT", 100, 20), (5.5, "GPT-4", 300, 0), (6.25, "GPT-4", 50, 7),
    (7.0, "ChatGPT", 80, 0), (9.0, "ChatGPT", 10, 3),
]
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def burstgpt_file(tmp_path: Path, rows=BURSTGPT_ROWS) -> Path:
    lines = [f"{t},{m},{i},{o},{i + o},Conversation log" for t, m, i, o in rows]
    return write(tmp_path / "burst.csv", [BURSTGPT_HEADER, *lines])


def mooncake_file(tmp_path: Path) -> Path:
    recs = [{"timestamp": 1000, "input_length": 700, "output_length": 12, "hash_ids": [0, 1]},
            {"timestamp": 0, "input_length": 40, "output_length": 3, "hash_ids": [2]},
            {"timestamp": 2500, "input_length": 1, "output_length": 0, "hash_ids": []}]
    return write(tmp_path / "mooncake.jsonl", [json.dumps(r) for r in recs] + [""])


def azure_file(tmp_path: Path, rows: list[str]) -> Path:
    return write(tmp_path / "azure.csv", [AZURE_HEADER, *rows])


def arrivals(trace: Trace) -> list[float]:
    return [r.arrival_s for r in trace.requests]


def make_trace(times: list[float], name: str = "t") -> Trace:
    return Trace([TraceRequest(t, 10 + i, 5 + i, i + 2) for i, t in enumerate(times)], name=name)


# --- loaders -------------------------------------------------------------------------------

needs_azure = pytest.mark.skipif(not AZURE_CODE.is_file(), reason="shared Azure traces missing")


@needs_azure
def test_azure_slice_loads_rebased_with_source_rows(tmp_path):
    lines = AZURE_CODE.read_text().splitlines()[:200]
    path = write(tmp_path / "code200.csv", lines)
    trace = load_azure(path)
    assert len(trace) == 199 and trace.name == "code200"
    assert trace.requests[0] == TraceRequest(0.0, 4808, 10, 2)
    assert trace.requests[1].arrival_s == pytest.approx(0.052, abs=1e-9)  # 18:17:04.03196 - .97996
    assert arrivals(trace) == sorted(arrivals(trace))
    for req in trace.requests[::37]:  # source_row points back at the line it came from
        _, ctx, gen = lines[req.source_row - 1].split(",")
        assert (req.input_len, req.output_len) == (int(ctx), int(gen))


@pytest.mark.skipif(not AZURE_CONV.is_file(), reason="shared Azure traces missing")
def test_full_conv_trace_loads_with_the_documented_rate():
    trace = load_trace(AZURE_CONV)
    assert len(trace) == 19366
    assert trace.rate() == pytest.approx(5.53, abs=0.01)  # README: 5.53 req/s


@pytest.mark.perf
@pytest.mark.skipif(not AZURE_CONV.is_file(), reason="shared Azure traces missing")
def test_full_conv_trace_loads_quickly():
    start = time.perf_counter()
    load_trace(AZURE_CONV)
    assert time.perf_counter() - start < 1.5


def test_burstgpt_drops_failed_and_filters_by_model(tmp_path):
    path = burstgpt_file(tmp_path)
    trace = load_burstgpt(path)
    assert [(r.arrival_s, r.input_len, r.output_len) for r in trace.requests] == [
        (0.0, 100, 20), (1.25, 50, 7), (4.0, 10, 3)]
    assert [r.source_row for r in trace.requests] == [2, 4, 6]
    assert len(load_burstgpt(path, drop_failed=False)) == 5
    gpt4 = load_burstgpt(path, model="GPT-4", drop_failed=False)
    assert [(r.input_len, r.output_len) for r in gpt4.requests] == [(300, 0), (50, 7)]
    assert gpt4.requests[0].arrival_s == 0.0 and gpt4.name == "burst[GPT-4]"


def test_burstgpt_model_with_no_requests_is_an_error(tmp_path):
    with pytest.raises(TraceFormatError, match="no requests"):
        load_burstgpt(burstgpt_file(tmp_path), model="Claude")


def test_mooncake_reads_milliseconds_and_sorts(tmp_path):
    trace = load_mooncake(mooncake_file(tmp_path))
    assert [(r.arrival_s, r.input_len, r.output_len, r.source_row) for r in trace.requests] == [
        (0.0, 40, 3, 2), (1.0, 700, 12, 1), (2.5, 1, 0, 3)]
    assert trace.duration_s == 2.5 and trace.rate() == pytest.approx(3 / 2.5)


@needs_azure
def test_format_is_sniffed_from_the_first_line(tmp_path):
    azure = write(tmp_path / "a.csv", AZURE_CODE.read_text().splitlines()[:20])
    burst, moon = burstgpt_file(tmp_path), mooncake_file(tmp_path)
    assert [sniff_format(p) for p in (azure, burst, moon)] == ["azure", "burstgpt", "mooncake"]
    assert len(load_trace(azure)) == 19 and len(load_trace(burst)) == 3
    assert len(load_trace(moon)) == 3 and len(load_trace(burst, model="GPT-4")) == 1
    assert set(LOADERS) == {"azure", "burstgpt", "mooncake"}


def test_unknown_format_and_wrong_explicit_format_are_refused(tmp_path):
    odd = write(tmp_path / "odd.csv", ["when,prompt,output", "1,2,3"])
    with pytest.raises(TraceFormatError, match=r"odd\.csv: line 1: unrecognized trace format"):
        load_trace(odd)
    with pytest.raises(ValueError, match="fmt='sharegpt'"):
        load_trace(odd, fmt="sharegpt")
    with pytest.raises(TraceFormatError) as err:
        load_trace(burstgpt_file(tmp_path), fmt="azure")
    assert "burst.csv: line 1: missing column(s) TIMESTAMP, ContextTokens, GeneratedTokens" in str(err.value)


@pytest.mark.parametrize("bad_row, reason", [
    ("2023-11-16 18:17:0x.1,10,5", "TIMESTAMP is not a date-time: '2023-11-16 18:17:0x.1'"),
    ("2023-11-16 18:17:05.1,12.5,5", "ContextTokens is not an integer: '12.5'"),
    ("2023-11-16 18:17:05.1,10,-3", "GeneratedTokens is negative: -3"),
    ("2023-11-16 18:17:05.1,0,3", "ContextTokens is 0"),
    ("2023-11-16 18:17:05.1,10", "expected at least 3 fields, got 2"),
])
def test_bad_azure_row_names_file_line_and_reason(tmp_path, bad_row, reason):
    path = azure_file(tmp_path, ["2023-11-16 18:17:04.0,10,5", "2023-11-16 18:17:04.5,11,6", bad_row])
    with pytest.raises(TraceFormatError) as err:
        load_azure(path)
    assert str(err.value).startswith(f"{path}: line 4: {reason}")
    assert err.value.line == 4 and err.value.path == path


def test_missing_columns_and_empty_traces_are_errors(tmp_path):
    with pytest.raises(TraceFormatError, match=r"missing column\(s\) GeneratedTokens"):
        load_azure(write(tmp_path / "a.csv", ["TIMESTAMP,ContextTokens", "2023-11-16 18:17:04.0,10"]))
    with pytest.raises(TraceFormatError, match=r"h\.csv: the trace has no requests"):
        load_azure(write(tmp_path / "h.csv", [AZURE_HEADER]))
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(TraceFormatError, match="empty"):
        load_trace(tmp_path / "e.csv")


@pytest.mark.parametrize("bad_row, reason", [
    ("5.0,ChatGPT,abc,3,3,Conversation log", "Request tokens is not an integer: 'abc'"),
    ("soon,ChatGPT,4,3,7,Conversation log", "Timestamp is not a number: 'soon'"),
    ("5.0,ChatGPT,0,3,3,Conversation log", "Request tokens is 0"),
])
def test_bad_burstgpt_row(tmp_path, bad_row, reason):
    path = write(tmp_path / "b.csv", [BURSTGPT_HEADER, "1.0,ChatGPT,4,3,7,Conversation log", bad_row])
    with pytest.raises(TraceFormatError, match=f"line 3: {reason}"):
        load_burstgpt(path)


@pytest.mark.parametrize("bad_line, reason", [
    ('{"timestamp": 5, "input_length": 3', "not valid JSON"),
    ('{"timestamp": 5, "output_length": 3}', "missing key(s) input_length"),
    ('{"timestamp": 5, "input_length": "3", "output_length": 3}', "input_length is not an integer: '3'"),
    ('{"timestamp": "x", "input_length": 3, "output_length": 3}', "timestamp is not a number"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"timestamp": 5, "input_length": 600, "output_length": 3, "hash_ids": [7]}',
     "1 hash_ids of 512 tokens do not cover input_length 600"),
    ('{"timestamp": 5, "input_length": 3, "output_length": 3, "hash_ids": ["a"]}', "hash_ids is not a list"),
])
def test_bad_mooncake_line(tmp_path, bad_line, reason):
    good = '{"timestamp": 0, "input_length": 3, "output_length": 3}'
    path = write(tmp_path / "m.jsonl", [good, "", bad_line])
    with pytest.raises(TraceFormatError) as err:
        load_mooncake(path)
    assert f"m.jsonl: line 3: {reason}" in str(err.value)


# --- model ---------------------------------------------------------------------------------


def test_trace_sorts_by_arrival_and_requests_validate():
    trace = make_trace([3.0, 1.0, 2.0, 1.0])
    assert arrivals(trace) == [1.0, 1.0, 2.0, 3.0]
    assert [r.source_row for r in trace.requests[:2]] == [3, 5]  # stable for equal times
    assert len(trace) == 4 and trace.duration_s == 3.0 and trace.rate() == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="input_len"):
        TraceRequest(0.0, 0, 1)
    with pytest.raises(ValueError, match="rate is undefined"):
        make_trace([0.0]).rate()


# --- transforms ----------------------------------------------------------------------------

TIMES = [0.0, 1.0, 2.0, 3.0, 5.0, 8.0]


def test_window_keeps_half_open_range_shifted_to_start():
    trace = make_trace(TIMES)
    cut = window(trace, 2.0, 5.0)
    assert arrivals(cut) == [0.0, 1.0]
    assert [r.source_row for r in cut.requests] == [4, 5]
    assert arrivals(trace) == TIMES  # the input is left alone
    assert arrivals(window(trace, 0.5, 100.0)) == [0.5, 1.5, 2.5, 4.5, 7.5]


def test_time_scale_divides_gaps():
    assert arrivals(time_scale(make_trace(TIMES), 2.0)) == [0.0, 0.5, 1.0, 1.5, 2.5, 4.0]
    assert arrivals(time_scale(make_trace([1.0, 3.0]), 0.5)) == [2.0, 6.0]


def test_upscale_integer_factors_are_exact():
    trace = gamma_bursty(50, 20, 1.0, seed=3)
    assert upscale(trace, 1.0, seed=0).requests == trace.requests
    doubled = upscale(trace, 2.0, seed=0)
    assert len(doubled) == 2 * len(trace)
    assert doubled.requests[::2] == trace.requests and doubled.requests[1::2] == trace.requests


def test_upscale_fractional_is_seeded_and_close_to_the_factor():
    trace = gamma_bursty(100, 20, 1.0, seed=3)
    n = len(trace)
    a, b, c = (upscale(trace, 1.5, seed=s) for s in (7, 7, 8))
    assert a.requests == b.requests and a.requests != c.requests
    assert 1.4 * n < len(a) < 1.6 * n and 1.4 * n < len(c) < 1.6 * n
    assert set(a.requests) <= set(trace.requests)
    assert 0.4 * n < len(upscale(trace, 0.5, seed=1)) < 0.6 * n


def test_repeat_window_plays_the_peak_again_and_shifts_the_rest():
    trace = make_trace(TIMES)
    rep = repeat_window(trace, 2.0, 5.0, times=3)
    assert len(rep) == len(trace) + 2 * 2
    assert arrivals(rep) == [0.0, 1.0, 2.0, 3.0, 5.0, 6.0, 8.0, 9.0, 11.0, 14.0]
    assert [r.source_row for r in rep.requests] == [2, 3, 4, 5, 4, 5, 4, 5, 6, 7]
    assert repeat_window(trace, 2.0, 5.0, times=1).requests == trace.requests


def test_scale_lengths_rounds_clips_and_fits_context():
    trace = Trace([TraceRequest(0.0, 1000, 100), TraceRequest(1.0, 1, 1), TraceRequest(2.0, 300, 2000),
                   TraceRequest(3.0, 10, 0)])
    assert [(r.input_len, r.output_len) for r in scale_lengths(trace, 2.0, 0.5).requests] == [
        (2000, 50), (2, 1), (600, 1000), (20, 1)]
    clipped = scale_lengths(trace, 2.0, 1.0, max_input=1500, max_output=1500, context_len=1200)
    assert [(r.input_len, r.output_len) for r in clipped.requests] == [
        (1100, 100), (2, 1), (1, 1199), (20, 1)]
    assert all(r.input_len + r.output_len <= 1200 for r in clipped.requests)
    small = scale_lengths(trace, 1e-4, 1e-4)  # rounds to 0, clipped up to 1
    assert all(r.input_len == 1 and r.output_len == 1 for r in small.requests)


def test_busiest_window_matches_brute_force():
    assert busiest_window(make_trace([0.0, 5.0, 5.5, 5.9, 9.0]), 1.0) == (5.0, 6.0)
    assert busiest_window(make_trace([0.0, 0.5, 5.0, 5.5]), 1.0) == (0.0, 1.0)  # ties: earliest
    trace = gamma_bursty(200, 5, 3.0, seed=11)
    times = arrivals(trace)
    start, end = busiest_window(trace, 10.0)
    best = max(sum(t <= u < t + 10.0 for u in times) for t in times)
    assert end - start == 10.0 and sum(start <= u < end for u in times) == best


@pytest.mark.parametrize("call, arg", [
    (lambda t: time_scale(t, 0), "factor"),
    (lambda t: time_scale(t, -1.0), "factor"),
    (lambda t: upscale(t, 0, seed=0), "s must"),
    (lambda t: window(t, 3.0, 3.0), "end_s"),
    (lambda t: repeat_window(t, 5.0, 2.0, 2), "end_s"),
    (lambda t: repeat_window(t, 2.0, 5.0, 0), "times"),
    (lambda t: scale_lengths(t, input_scale=0), "input_scale"),
    (lambda t: scale_lengths(t, context_len=1), "context_len"),
    (lambda t: busiest_window(t, 0), "length_s"),
])
def test_bad_arguments_name_the_argument(call, arg):
    with pytest.raises(ValueError, match=arg):
        call(make_trace(TIMES))


# --- synthetic -----------------------------------------------------------------------------


def gaps(trace: Trace) -> list[float]:
    t = arrivals(trace)
    return [b - a for a, b in zip(t, t[1:])]


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_arrivals_have_the_requested_cv_and_rate(cv):
    trace = gamma_bursty(2000, 10, cv, seed=1)
    g = gaps(trace)
    assert statistics.pstdev(g) / statistics.fmean(g) == pytest.approx(cv, rel=0.15)
    assert trace.rate() == pytest.approx(10, rel=0.15 if cv > 1 else 0.05)
    assert trace.requests[0].arrival_s == 0.0 and trace.duration_s < 2000


def test_bursts_multiply_the_rate_inside_their_window():
    trace = gamma_bursty(300, 10, 1.0, seed=2, bursts=[BurstWindow(100, 150, 5.0)])
    inside = sum(100 <= t < 150 for t in arrivals(trace)) / 50
    outside = sum(not 100 <= t < 150 for t in arrivals(trace)) / 250
    assert inside == pytest.approx(50, rel=0.15) and outside == pytest.approx(10, rel=0.15)
    with pytest.raises(ValueError, match="overlap"):
        gamma_bursty(300, 10, 1.0, seed=2, bursts=[BurstWindow(10, 50, 2), BurstWindow(40, 60, 2)])


def test_gamma_bursty_is_deterministic_from_the_seed():
    a, b, c = (gamma_bursty(60, 10, 2.0, seed=s, bursts=[BurstWindow(20, 30, 3)]) for s in (5, 5, 6))
    assert a.requests == b.requests and a.requests != c.requests
    # Lengths come from their own stream: changing them leaves the arrivals alone.
    d = gamma_bursty(60, 10, 2.0, seed=5, input_len=(50, 50), bursts=[BurstWindow(20, 30, 3)])
    assert arrivals(d) == arrivals(a) and {r.input_len for r in d.requests} == {50}


def test_lengths_follow_mean_and_median():
    trace = gamma_bursty(1000, 20, 1.0, seed=4, input_len=LengthDist(1000, 500),
                         output_len=LengthDist(200, 100, max_len=300))
    ins = [r.input_len for r in trace.requests]
    outs = [r.output_len for r in trace.requests]
    assert statistics.median(ins) == pytest.approx(500, rel=0.1)
    assert statistics.fmean(ins) == pytest.approx(1000, rel=0.15)
    assert min(ins) >= 1 and max(outs) == 300 and min(outs) >= 1
    with pytest.raises(ValueError, match="median <= mean"):
        LengthDist(10, 20)


# --- prompts -------------------------------------------------------------------------------


def check_exact(tok, synth: PromptSynthesizer, sizes) -> None:
    wrong = {n: len(tok.encode(p, add_special_tokens=True))
             for n in sizes if len(tok.encode(p := synth.prompt(n, index=n))) != n}
    assert not wrong, f"requested -> got: {wrong}"


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_store):
    from engines.tokenizer import Tokenizer

    return Tokenizer(tiny_store / "tokenizer")


def test_tiny_prompts_have_exact_token_counts(tiny_tokenizer):
    synth = PromptSynthesizer(tiny_tokenizer, seed=0)
    assert synth.overhead == 1  # the tiny tokenizer prepends BOS
    check_exact(tiny_tokenizer, synth, range(2, 301))
    with pytest.raises(ValueError, match="n_tokens=1 "):
        synth.prompt(1, 0)


def test_prompts_are_deterministic_and_distinct(tiny_tokenizer):
    a, b, c = (PromptSynthesizer(tiny_tokenizer, seed=s) for s in (1, 1, 2))
    texts = [a.prompt(64, i) for i in range(300)]
    assert texts == [b.prompt(64, i) for i in range(300)]
    assert len(set(texts)) == 300 and len({t[0] for t in texts[:40]}) > 20  # differ up front
    assert texts[:50] != [c.prompt(64, i) for i in range(50)]
    # Two text tokens: the index spelled in two words keeps all 52*52 of them apart.
    assert len({a.prompt(3, i) for i in range(52 * 52)}) == 52 * 52


class MergingTokenizer:
    """Letters are tokens, but "ab" is one: word counts are not additive, so fix-ups must run."""

    _pieces = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    _pieces += ["ab"]
    vocab_size = len(_pieces)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self._pieces.index(p) for p in re.findall("ab|.", text)]
        return [0, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self._pieces[i] for i in ids)


def test_prompts_fix_up_counts_when_words_merge():
    tok = MergingTokenizer()
    synth = PromptSynthesizer(tok, seed=0)
    check_exact(tok, synth, range(2, 200))
    assert any("ab" in synth.prompt(n, n) for n in range(50, 200))  # merges did happen


@pytest.mark.slow
def test_smollm2_prompts_have_exact_token_counts(smollm2_store):
    from engines.store import EngineStore
    from engines.tokenizer import Tokenizer

    tok = Tokenizer(EngineStore(smollm2_store).tokenizer_dir)
    synth = PromptSynthesizer(tok, seed=0)
    sizes = [1, 2, 3, 17, 2000] + random.Random(0).sample(range(1, 2001), 60)
    check_exact(tok, synth, sizes)
    texts = {synth.prompt(32, i) for i in range(200)}
    assert len(texts) == 200


@pytest.mark.perf
@pytest.mark.slow
def test_smollm2_prompts_are_made_quickly(smollm2_store):
    from engines.store import EngineStore
    from engines.tokenizer import Tokenizer

    tok = Tokenizer(EngineStore(smollm2_store).tokenizer_dir)
    synth = PromptSynthesizer(tok, seed=0)
    sizes = [1, 2, 3, 17, 2000] + random.Random(0).sample(range(1, 2001), 60)
    start = time.perf_counter()
    check_exact(tok, synth, sizes)
    assert time.perf_counter() - start < 5


def test_mooncake_hash_ids_are_kept_through_the_transforms(tmp_path):
    trace = load_mooncake(mooncake_file(tmp_path))
    assert [r.block_hashes for r in trace.requests] == [(2,), (0, 1), ()]
    scaled = scale_lengths(time_scale(trace, 2.0), 0.5, 1.0, 10_000, 10_000, None)
    assert [r.block_hashes for r in scaled.requests] == [(2,), (0, 1), ()]


def test_block_prompts_share_exactly_the_blocks_their_hashes_share(tiny_tokenizer):
    synth = PromptSynthesizer(tiny_tokenizer, seed=0)
    a = tiny_tokenizer.encode(synth.prompt_blocks((5, 6, 7), 21, 8))
    b = tiny_tokenizer.encode(synth.prompt_blocks((5, 6, 9), 23, 8))
    c = tiny_tokenizer.encode(synth.prompt_blocks((4, 6, 7), 21, 8))
    assert len(a) == 21 and len(b) == 23  # exact, BOS included
    assert a[:17] == b[:17] and a[17:21] != b[17:21]  # BOS + two shared blocks, then the third differs
    assert a[1:9] != c[1:9] and a[9:17] == c[9:17]  # same block, other position: same tokens (no prefix)
    with pytest.raises(ValueError, match="cannot make"):
        synth.prompt_blocks((1,), 20, 8)
