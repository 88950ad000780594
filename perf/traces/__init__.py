"""Request traces for serving benchmarks: load public traces, synthesize, transform, make prompts.

>>> trace = load_trace("AzureLLMInferenceTrace_conv.csv")     # format sniffed from the header
>>> peak = window(trace, *busiest_window(trace, 60.0))
>>> heavier = upscale(time_scale(peak, 2.0), 1.5, seed=0)
"""

from perf.traces.loaders import (LOADERS, load_azure, load_burstgpt, load_mooncake, load_trace,
                                 sniff_format)
from perf.traces.model import Trace, TraceFormatError, TraceRequest
from perf.traces.prompts import PromptSynthesizer
from perf.traces.synthetic import BurstWindow, LengthDist, gamma_bursty
from perf.traces.transforms import (busiest_window, repeat_window, scale_lengths, time_scale, upscale,
                                    window)

__all__ = [
    "LOADERS", "BurstWindow", "LengthDist", "PromptSynthesizer", "Trace", "TraceFormatError",
    "TraceRequest", "busiest_window", "gamma_bursty", "load_azure", "load_burstgpt", "load_mooncake",
    "load_trace", "repeat_window", "scale_lengths", "sniff_format", "time_scale", "upscale", "window",
]
